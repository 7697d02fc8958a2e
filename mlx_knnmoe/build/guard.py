"""A guard set for the original domain: text the model samples itself (by construction from
the distribution it was trained on), or a file the user gives (``--guard FILE``; read by
``calibrate_rule.guard_examples``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..data.examples import Example
from .calibrate_rule import sampled_guard


def sample_guard(
    model: nn.Module, start_token: int, count: int = 32, length: int = 64, seed: int = 0
) -> list[Example]:
    """``count`` sequences of ``length`` tokens sampled at temperature 1 from ``start_token``
    (one batch); every token after the first is a target."""
    key = mx.random.key(seed)
    tokens = mx.full((count, 1), start_token, dtype=mx.int32)
    for _ in range(length - 1):  # no KV cache: the sequences are short, and mlx_lm's cache
        # module would pull transformers into ``import mlx_knnmoe``
        logits = model(tokens)[:, -1, :].astype(mx.float32)
        key, sub = mx.random.split(key)
        new = mx.random.categorical(logits, key=sub)[:, None].astype(mx.int32)
        tokens = mx.concatenate([tokens, new], axis=1)
        mx.eval(tokens)
    return sampled_guard(tokens.tolist())
