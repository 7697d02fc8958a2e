"""What Hugging Face (transformers 5) checkpoints need before mlx-lm reads them.

Found by converting tiny checkpoints that transformers 5.23 itself writes, for every supported
architecture, and comparing logits (tests/test_convert.py):

- ``rope_parameters``: transformers 5 writes ``rope_theta``, ``partial_rotary_factor`` and the
  scaling settings inside it; mlx-lm reads top-level ``rope_theta``, ``rope_scaling`` and
  ``partial_rotary_factor``. Without them qwen3_moe, granitemoe and glm4_moe fail to load,
  deepseek_v2 fails on its YaRN settings, and qwen2_moe and mixtral load with mlx-lm's default
  theta (1e6) and silently wrong positions.
- qwen3_moe: transformers 5 saves the expert count as ``num_local_experts``; mlx-lm needs
  ``num_experts``.
- ``dtype``: transformers 5 writes it where mlx-lm's conversion looks for ``torch_dtype``.
- gpt_oss: unquantised checkpoints keep the experts fused as ``experts.gate_up_proj``
  [E, hidden, 2*inter] (gate and up interleaved) and ``experts.down_proj`` [E, inter, hidden],
  used as ``x @ W``; mlx-lm's sanitize expects the original checkpoint's ``[E, out, in]``
  layout named ``.weight`` (what its MXFP4 ``_blocks`` become), so they are transposed.
- YaRN with ``truncate: false`` (GPT-OSS): mlx-lm always rounds the correction range to whole
  dimensions, so some rotary frequencies differ; this cannot be expressed in an mlx-lm config,
  so it is reported with the size of the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


@dataclass
class Fixups:
    patch: dict = field(default_factory=dict)  # config entries to add for mlx-lm
    notes: list[str] = field(default_factory=list)  # what was changed, for the user
    warnings: list[str] = field(default_factory=list)  # what could not be fixed


def config_fixups(config: dict) -> Fixups:
    """The config entries mlx-lm needs that a transformers-5 ``config.json`` lacks."""
    fix = Fixups()
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        _rope_fixups(config, rope, fix)
    if config.get("model_type") == "qwen3_moe" and "num_experts" not in config:
        if "num_local_experts" in config:
            fix.patch["num_experts"] = config["num_local_experts"]
            fix.notes.append("num_experts = num_local_experts (qwen3_moe)")
    if "torch_dtype" not in config and isinstance(config.get("dtype"), str):
        fix.patch["torch_dtype"] = config["dtype"]
        fix.notes.append(f"torch_dtype = dtype ({config['dtype']})")
    return fix


def _rope_fixups(config: dict, rope: dict, fix: Fixups) -> None:
    if "rope_theta" not in config:
        fix.patch["rope_theta"] = rope["rope_theta"]
        fix.notes.append(f"rope_theta = rope_parameters.rope_theta ({rope['rope_theta']})")
    if "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
        fix.patch["partial_rotary_factor"] = rope["partial_rotary_factor"]
        fix.notes.append("partial_rotary_factor from rope_parameters")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if config.get("rope_scaling") is None:
        if rope_type == "default":
            fix.patch["rope_scaling"] = None  # some mlx-lm models require the field
        else:
            scaling = {k: v for k, v in rope.items() if k not in _NOT_SCALING}
            fix.patch["rope_scaling"] = {**scaling, "type": rope_type, "rope_type": rope_type}
            fix.notes.append(f"rope_scaling from rope_parameters ({rope_type})")
    if rope_type == "yarn" and rope.get("truncate") is False:
        fix.warnings.append(_yarn_truncate_warning(config, rope))


def _rotary_dims(config: dict, rope: dict) -> int:
    dims = config.get("qk_rope_head_dim") or config.get("head_dim")
    dims = dims or config["hidden_size"] // config.get("num_attention_heads", 1)
    return int(dims * rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))


def yarn_inv_freq(dims: int, rope: dict, truncate: bool) -> np.ndarray:
    """YaRN inverse frequencies as transformers computes them (``truncate`` rounds the
    correction range to whole dimensions, which is what mlx-lm's YarnRoPE always does)."""
    base, factor = rope["rope_theta"], rope["factor"]
    original = rope.get("original_max_position_embeddings", 4096)

    def correction_dim(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast", 32)), correction_dim(rope.get("beta_slow", 1))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 / base ** (np.arange(0, dims, 2) / dims)
    return extrapolation / factor * ramp + extrapolation * (1.0 - ramp)


def _yarn_truncate_warning(config: dict, rope: dict) -> str:
    dims = _rotary_dims(config, rope)
    exact = yarn_inv_freq(dims, rope, truncate=False)
    mlx = yarn_inv_freq(dims, rope, truncate=True)
    rel = np.abs(mlx - exact) / exact
    differ = np.nonzero(rel > 1e-6)[0]
    where = f"rotary pairs {differ.min()}-{differ.max()} of {dims // 2}" if len(differ) else "none"
    return (
        "rope_parameters has YaRN with truncate: false, but mlx-lm's YaRN always rounds the "
        "correction range to whole dimensions; the converted model's rotary frequencies differ "
        f"from the checkpoint's by up to {rel.max():.2%} ({where}), so its outputs will not "
        "match transformers exactly"
    )


def _gpt_oss_weights(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        fused = key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj")
        if fused and value.ndim == 3:
            out[key + ".weight"] = mx.swapaxes(value, -1, -2)
        else:
            out[key] = value
    return out


WEIGHT_FIXUPS = {"gpt_oss": _gpt_oss_weights}


def model_classes(config: dict):
    """``mlx_lm.utils.load_model``'s ``get_model_classes`` with the weight fix-ups applied
    before the model's own ``sanitize`` (a subclass used for conversion only)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    fix = WEIGHT_FIXUPS.get(config.get("model_type"))
    if fix is None:
        return model_class, args_class

    class Fixed(model_class):
        def sanitize(self, weights):
            return super().sanitize(fix(weights))

    return Fixed, args_class
