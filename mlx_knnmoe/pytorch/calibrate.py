"""Calibrated confidence in torch: the score by which the shared rule of
``mlx_knnmoe.build.calibrate_rule`` (the MLX builder's choice of eta and each layer's
bandwidth scale under a guard) judges a memory, on a transformers model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..build.calibrate_rule import Rows, Score
from ..config import KNNConfig
from .eta_choice import Batch
from .gradient import row_nll
from .router import attach, detach
from .store import Memory


@torch.no_grad()
def batch_rows_nll(model: nn.Module, batches: list[Batch]) -> Rows:
    """Summed target NLL per sequence (in batch order) and the number of targets."""
    rows = [row_nll(model, tokens, mask).cpu().numpy() for tokens, mask in batches]
    return np.concatenate(rows), float(sum(float(mask[:, 1:].sum()) for _, mask in batches))


@contextmanager
def scoring(
    model: nn.Module, heldout: list[Batch], guard: list[Batch], config: KNNConfig
) -> Iterator[Score]:
    """The ``score`` of ``calibrate_rule.choose_settings``: a memory (None: none) attached to
    ``model`` with the retrieval ``config``, the rows of ``heldout`` and ``guard``. The model
    is left without a memory at the end of the block."""

    def score(memory: Memory | None) -> tuple[Rows, Rows]:
        detach(model)
        if memory is not None:
            attach(model, memory, config, validate=False)
        return batch_rows_nll(model, heldout), batch_rows_nll(model, guard)

    try:
        yield score
    finally:
        detach(model)
