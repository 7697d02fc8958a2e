"""Small random MoE models of every supported architecture, built in code (no downloads), for
the tests, from the package's tiny configs (``mlx_knnmoe/speed/tiny_configs.json``).
``make_tiny_model_dir`` writes an mlx-lm model directory that ``mlx_lm.load`` reads offline;
``make_hf_checkpoint`` a transformers checkpoint (needs torch)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_knnmoe.speed.random_models import (
    TINY_CONFIGS,
    random_model,
    save_model_dir,
    save_tokenizer,
    tiny_config,
)

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model", "make_tiny_model_dir", "make_hf_checkpoint"]


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
