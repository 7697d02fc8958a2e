"""Choosing the step size eta by the NLL of held-out reference data through retrieval."""

from __future__ import annotations

from collections.abc import Callable

import mlx.nn as nn

from ..config import KNNConfig
from ..data.batches import Batch
from ..memory.store import Memory
from ..retrieval.attach import attach, detach, routers
from .gradient import target_nll
from .plan import scan_eta_grid


def heldout_nll(
    model: nn.Module, batches: list[Batch], memory: Memory | None, config: KNNConfig
) -> float:
    """Mean NLL per target token over ``batches`` with ``memory`` attached (None: plain).

    The memory stays attached; ``choose_eta`` detaches it. A memory with the keys of the one
    attached only swaps the values, so its search index is not built again.
    """
    if memory is None:
        detach(model)
    elif not _swap_values(model, memory):
        attach(model, memory, config, validate=False)
    total = sum(float(target_nll(model, b.tokens, b.loss_mask)) for b in batches)
    targets = sum(float(b.loss_mask[:, 1:].sum()) for b in batches)
    return total / max(targets, 1.0)


def choose_eta(
    model: nn.Module,
    heldout: list[Batch],
    memory_for: Callable[[float], Memory],
    grid: tuple[float, ...],
    config: KNNConfig,
    patience: int | None = 2,
) -> dict:
    """Score the etas of ``grid`` (``plan.scan_eta_grid``; memory_for(eta) is built without
    the held-out examples) and leave the model without a memory."""
    try:
        baseline = heldout_nll(model, heldout, None, config)
        score = lambda eta: heldout_nll(model, heldout, memory_for(eta), config)  # noqa: E731
        return scan_eta_grid(score, baseline, grid, patience)
    finally:
        detach(model)


def _swap_values(model: nn.Module, memory: Memory) -> bool:
    found = routers(model)
    attached = [r.memory for r in found.values() if r.memory is not None]
    if not attached or any(m.keys is not memory.keys.get(m.layer) for m in attached):
        return False
    for router in found.values():
        if router.memory is not None:
            router.memory = router.memory.with_logits(memory.logits[router.layer])
    return True
