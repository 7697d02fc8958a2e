"""Small random MoE models of every supported architecture, built in code (no downloads).

Used by the tests, the benchmark, and the README's offline quick start. ``save_model_dir``
writes an mlx-lm model directory (config.json, model.safetensors, tokenizer files) that
``mlx_lm.load`` reads offline.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

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
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
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


def build_model(config: dict, seed: int = 0, std: float = 0.1) -> nn.Module:
    """An mlx-lm model from ``config`` with N(0, std) weights (norm scales stay 1)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)

    def init(path, w):
        if "norm" in path or w.ndim == 0:
            return w
        return mx.random.normal(w.shape, dtype=w.dtype) * std

    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, init(k, v)) for k, v in params.items()])
    mx.eval(model.parameters())
    return model


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    return build_model(tiny_config(model_type, **overrides), seed=seed)


def _byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a few lines; the fast-tokenizer JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The patient presents with fever and cough. The answer is A.",
        "Question: which expert handles this token? Answer: B",
        "def route(x): return top_k(softmax(x @ W))",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_model_dir(model: nn.Module, config: dict, path: str | Path) -> Path:
    """Write an mlx-lm model directory for ``model`` with a small byte-level tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 0}, indent=2))
    save_tokenizer(path, config["vocab_size"])
    return path


def save_tokenizer(path: str | Path, vocab_size: int) -> None:
    """Write the small byte-level tokenizer (ids below ``min(vocab_size, 300)``) into ``path``."""
    path = Path(path)
    _byte_tokenizer(min(vocab_size, 300)).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "chat_template": _CHAT_TEMPLATE,
            }
        )
    )


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
