"""Examples to padded batches (NumPy, framework-free): grouped by length so little compute goes
to padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import KEEP


@dataclass
class Batch:
    rows: list[int]  # example indices, in the order their entries are stored
    tokens: np.ndarray  # [B, L] right-padded, int32
    loss_mask: np.ndarray  # [B, L] 1 where tokens[:, t] is a target
    keep_mask: np.ndarray  # [B, L] 1 where position t's router input is stored
    num_tokens: int  # real (non-padding) tokens


def length_groups(lengths: list[int], batch_tokens: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped longest first; each group's rows x longest length <= batch_tokens.

    The order depends only on the lengths (stable for ties), so it is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = len(current) + 1 > max_batch or (len(current) + 1) * longest > batch_tokens
        if current and full:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def make_batch(examples, rows: list[int], keep: str = "all", pad_id: int = 0) -> Batch:
    """Right-pad ``examples[rows]``. ``keep``: ``all`` non-padding positions, or ``targets``
    (positions whose next token is a target: the router inputs that predict the answer)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    length = max(len(examples[i].tokens) for i in rows)
    tokens = np.full((len(rows), length), pad_id, dtype=np.int32)
    loss = np.zeros((len(rows), length), dtype=np.float32)
    kept = np.zeros((len(rows), length), dtype=np.float32)
    for b, i in enumerate(rows):
        n = len(examples[i].tokens)
        tokens[b, :n] = examples[i].tokens
        loss[b, :n] = examples[i].loss_mask
        if keep == "all":  # a row's last token predicts nothing: no gradient, not stored
            kept[b, : n - 1] = 1
        else:
            kept[b, : n - 1] = loss[b, 1:n]
    real = sum(len(examples[i].tokens) for i in rows)
    return Batch(rows, tokens, loss, kept, real)


def stored_rows(keep_mask: np.ndarray) -> np.ndarray:
    """Indices of the stored positions among a batch's flattened router inputs [B*(L-1)]
    (the forward runs on tokens[:, :-1]; a row's last position is never stored)."""
    return np.flatnonzero(np.asarray(keep_mask)[:, :-1].reshape(-1)).astype(np.int32)
