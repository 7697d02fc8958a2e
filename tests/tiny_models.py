"""Small random MoE models of every supported architecture, built in code (no downloads), for
the tests. ``make_tiny_model_dir`` writes an mlx-lm model directory that ``mlx_lm.load`` reads
offline; ``make_hf_checkpoint`` a transformers checkpoint (needs torch)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_knnmoe.speed.random_models import random_model, save_model_dir, save_tokenizer

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    vocab_size=320,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

_DEEPSEEK = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.5,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)

TINY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=True,
    ),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.01),
    "granitemoe": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        logits_scaling=1.0,
        attention_multiplier=0.25,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        attention_bias=False,
    ),
    "deepseek_v2": dict(
        _DEEPSEEK,
        topk_method="group_limited_greedy",
        rope_scaling={
            "type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": 512,
            "mscale": 1.0,
            "mscale_all_dim": 0.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
    "deepseek_v3": dict(_DEEPSEEK, topk_method="noaux_tc", norm_topk_prob=True),
    "glm4_moe": dict(
        _DEEPSEEK,
        norm_topk_prob=True,
        rope_scaling=None,
        use_qk_norm=True,
        attention_bias=False,
        partial_rotary_factor=0.5,
    ),
}


def tiny_config(model_type: str, **overrides) -> dict:
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for '{model_type}'; have {sorted(TINY_CONFIGS)}")
    return {**_COMMON, **TINY_CONFIGS[model_type], "model_type": model_type, **overrides}


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    return random_model(tiny_config(model_type, **overrides), seed=seed)


def make_tiny_model_dir(path: str | Path, model_type: str = "qwen3_moe", seed: int = 0) -> Path:
    config = tiny_config(model_type)
    return save_model_dir(tiny_model(model_type, seed=seed), config, path)


def cast(model: nn.Module, dtype) -> nn.Module:
    model.update(
        tree_map(
            lambda w: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w,
            model.parameters(),
        )
    )
    return model


# transformers' configs differ from mlx-lm's on a few points: PhiMoE checkpoints carry attention
# and lm_head biases (mlx-lm's phimoe always has them), DeepSeek's rotary size comes from
# qk_rope_head_dim (a head_dim would conflict), and GPT-OSS always uses YaRN.
HF_OVERRIDES: dict[str, dict] = {
    "phimoe": dict(attention_bias=True, lm_head_bias=True),
    "gpt_oss": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": True,
        }
    ),
}
HF_DROP: dict[str, tuple[str, ...]] = {"deepseek_v2": ("head_dim",), "deepseek_v3": ("head_dim",)}


def make_hf_checkpoint(
    path: str | Path, model_type: str = "qwen3_moe", seed: int = 0, std: float = 0.1, **overrides
) -> Path:
    """A tiny random Hugging Face checkpoint made by transformers itself (its config class,
    ``from_config`` and ``save_pretrained``; float32, N(0, std) weights, norms 1) with the
    byte-level tokenizer. Needs torch and transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in tiny_config(model_type).items() if k != "model_type"}
    for key in HF_DROP.get(model_type, ()):
        config.pop(key, None)
    config.update(HF_OVERRIDES.get(model_type, {}), eos_token_id=0, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **config), dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, std)
    path = Path(path)
    model.save_pretrained(path)
    save_tokenizer(path, config["vocab_size"])
    return path
