"""The NLL of held-out reference data through retrieval (torch), the score by which
``mlx_knnmoe.build.plan.scan_eta_grid`` chooses eta."""

from __future__ import annotations

import torch
from torch import nn

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
