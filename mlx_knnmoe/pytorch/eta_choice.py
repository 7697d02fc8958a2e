"""Choosing eta by the NLL of held-out reference data through retrieval (torch; mirrors
``mlx_knnmoe.build.eta_choice``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..build.plan import scan_eta_grid
from ..config import KNNConfig
from .gradient import target_nll
from .router import attach, detach
from .store import Memory

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
    """Score the etas of ``grid`` (``mlx_knnmoe.build.plan.scan_eta_grid``)."""
    baseline = heldout_nll(model, heldout, None, config)
    score = lambda eta: heldout_nll(model, heldout, memory_for(eta), config)  # noqa: E731
    return scan_eta_grid(score, baseline, grid, patience)
