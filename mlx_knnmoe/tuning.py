"""Choosing the step size eta by the NLL of held-out reference data through retrieval."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import mlx.nn as nn

from .batches import Batch
from .build import target_nll
from .config import KNNConfig
from .memory import Memory
from .router import _routers, attach, detach

DEFAULT_ETA_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


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
    """Score the etas of ``grid`` in increasing order (memory_for(eta) is built without the
    held-out examples); stop once ``patience`` scores in a row are worse than the best so far
    (the rest are recorded as None). ``patience=None`` scores the whole grid."""
    baseline = heldout_nll(model, heldout, None, config)
    try:
        score = lambda eta: heldout_nll(model, heldout, memory_for(eta), config)  # noqa: E731
        return scan_eta_grid(score, baseline, grid, patience)
    finally:
        detach(model)


def scan_eta_grid(
    score: Callable[[float], float], baseline: float, grid: tuple[float, ...], patience: int | None
) -> dict:
    """The grid scan itself (framework-free, shared with the PyTorch reference)."""
    scores: list[float | None] = []
    for eta in sorted(grid):  # a too-large step only gets worse: stop once it has turned
        scores.append(score(eta))
        done = [s for s in scores if s is not None]
        if patience and len(done) > patience and min(done) < min(done[-patience:]):
            break
    grid = tuple(sorted(grid))
    scores += [None] * (len(grid) - len(scores))
    best = min((i for i in range(len(grid)) if scores[i] is not None), key=lambda i: scores[i])
    if not scores[best] < baseline or math.isnan(scores[best]):
        warnings.warn(
            f"eta auto: no eta in {list(grid)} lowered the held-out NLL "
            f"(plain {baseline:.4f}, best {scores[best]:.4f} at eta={grid[best]}); "
            "the memory may not help on this data",
            stacklevel=3,
        )
    return {"grid": list(grid), "heldout_nll": scores, "plain_nll": baseline, "eta": grid[best]}


def _swap_values(model: nn.Module, memory: Memory) -> bool:
    routers = _routers(model)
    attached = [r._memory for r in routers.values() if r._memory is not None]
    if not attached or any(m.keys is not memory.keys.get(m.layer) for m in attached):
        return False
    for router in routers.values():
        if router._memory is not None:
            router._memory = router._memory.with_logits(memory.logits[router._layer])
    return True
