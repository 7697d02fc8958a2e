"""Choosing eta by the NLL of held-out reference data through retrieval (torch; mirrors
``mlx_knnmoe.tuning``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..config import KNNConfig
from .build import target_nll
from .memory_io import Memory
from .router import attach, detach

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens [B, L], loss mask [B, L]


@torch.no_grad()
def heldout_nll(
    model: nn.Module, batches: list[Batch], memory: Memory | None, config: KNNConfig
) -> float:
    """Mean NLL per target token over ``batches``, with ``memory`` attached (None: plain)."""
    if memory is not None:
        attach(model, memory, config, validate=False)
    try:
        total = sum(float(target_nll(model, tokens, mask)) for tokens, mask in batches)
    finally:
        if memory is not None:
            detach(model)
    targets = sum(float(mask[:, 1:].sum()) for _, mask in batches)
    return total / max(targets, 1.0)


def choose_eta(
    model: nn.Module,
    heldout: list[Batch],
    memory_for: Callable[[float], Memory],
    grid: tuple[float, ...],
    config: KNNConfig,
    patience: int | None = 2,
) -> dict:
    """Score the etas of ``grid`` in increasing order; stop once ``patience`` scores in a row
    are worse than the best so far (the rest are recorded as None)."""
    baseline = heldout_nll(model, heldout, None, config)
    scores: list[float | None] = []
    for eta in sorted(grid):
        scores.append(heldout_nll(model, heldout, memory_for(eta), config))
        done = [s for s in scores if s is not None]
        if patience and len(done) > patience and min(done) < min(done[-patience:]):
            break
    grid = tuple(sorted(grid))
    scores += [None] * (len(grid) - len(scores))
    best = min((i for i in range(len(grid)) if scores[i] is not None), key=lambda i: scores[i])
    if not scores[best] < baseline or math.isnan(scores[best]):
        warnings.warn(
            f"eta auto: no eta in {list(grid)} lowered the held-out NLL "
            f"(plain {baseline:.4f}, best {scores[best]:.4f} at eta={grid[best]})",
            stacklevel=2,
        )
    return {"grid": list(grid), "heldout_nll": scores, "plain_nll": baseline, "eta": grid[best]}
