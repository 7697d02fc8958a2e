"""Calibrated confidence in MLX: the shared rule of build/calibrate_rule.py (eta and each
layer's bandwidth scale chosen on held-out reference data, guarded by the original domain;
docs/METHOD.md, "Calibrated confidence") scored by an MLX model with the memory attached."""

from __future__ import annotations

from collections.abc import Callable

import mlx.nn as nn
import numpy as np

from ..config import KNNConfig
from ..data.batches import Batch
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .calibrate_rule import Eta, Rows, choose_settings
from .gradient import row_nll


def batch_rows_nll(model: nn.Module, batches: list[Batch]) -> Rows:
    """Summed target NLL per sequence (in batch order) and the number of targets."""
    rows = [np.array(row_nll(model, b.tokens, b.loss_mask)) for b in batches]
    return np.concatenate(rows), float(sum(b.loss_mask[:, 1:].sum() for b in batches))


def calibrate(
    model: nn.Module,
    heldout: list[Batch],
    guard: list[Batch],
    memory_for: Callable[[Eta, dict[int, float]], Memory | None],
    eta: float,
    layers: list[int],
    config: KNNConfig,
    around: Callable[[float], list[float]] | None = None,
    layer_eta: bool = False,
) -> dict:
    """``calibrate_rule.choose_settings`` with each trial's memory attached to ``model``
    (``config``: the retrieval) and scored on the ``heldout`` and ``guard`` batches. Leaves
    the model without a memory."""

    def score(memory: Memory | None) -> tuple[Rows, Rows]:
        if memory is None:
            detach(model)
        else:
            attach(model, memory, config, validate=False)
        return batch_rows_nll(model, heldout), batch_rows_nll(model, guard)

    try:
        return choose_settings(score, memory_for, eta, layers, around, layer_eta)
    finally:
        detach(model)
