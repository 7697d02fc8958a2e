"""Real MoE models' shapes for the realistic benchmark, as random-weight mlx-lm models with a
reduced number of layers, quantised to 4 bits as the mlx-community checkpoints are, and the
bytes the whole model would take.

The sizes are those of the models' Hugging Face configs, read through mlx-lm's model args
(``mlx_lm.models.olmoe`` / ``qwen3_moe`` / ``gpt_oss``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import quantize_model

# name -> the model's Hugging Face config fields that mlx-lm reads (data: shapes.json)
SHAPES: dict[str, dict] = json.loads(Path(__file__).with_name("shapes.json").read_text())


def reduced_config(shape: str, layers: int) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    if layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    config = dict(SHAPES[shape], num_hidden_layers=layers)
    if config["model_type"] == "gpt_oss":  # its attention alternates sliding and full
        config["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + [
            "sliding_attention"
        ] * (layers % 2)
    return config


def quantised_random_model(config: dict, bits: int = 4, group_size: int = 64, seed: int = 0):
    """The model with N(0, 0.02) weights, quantised as ``mlx_lm.convert -q`` does (the
    model's own predicate keeps routers at 8 bits where it says so). Activations stay
    float32: MLX's CPU back end has no fast half-precision quantised matmul."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    model.update(
        tree_map(
            lambda w: w if w.ndim < 2 else mx.random.normal(w.shape) * 0.02, model.parameters()
        )
    )
    for layer in model.layers:  # one layer at a time: the float weights never all exist
        mx.eval(layer.parameters())
    quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())
    return model


def _checkpoint_bytes(w: mx.array) -> int:
    """Bytes in an mlx-community checkpoint: packed weights as they are, every other
    tensor (scales, biases, norms) in bfloat16."""
    return w.nbytes if w.dtype == mx.uint32 else w.size * 2


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes outside the decoder layers, bytes of one decoder layer on average), as the
    4-bit checkpoint stores them."""
    params = tree_flatten(model.parameters())
    total = sum(_checkpoint_bytes(v) for _, v in params)
    layer_bytes = sum(_checkpoint_bytes(v) for k, v in params if ".layers." in f".{k}")
    return total - layer_bytes, layer_bytes // len(model.layers)


def full_model_bytes(model: nn.Module, shape: str) -> int:
    """Bytes of the whole quantised model: the reduced one's non-layer bytes plus its mean
    layer times the real number of layers."""
    outside, per_layer = model_bytes(model)
    return outside + per_layer * SHAPES[shape]["num_hidden_layers"]
