"""Values stored compactly: only each entry's top-m experts' optimised logits, plus one "rest"
logit that stands for every expert not stored (``compress_memory --top-experts M``).

An entry's value row r [N] becomes expert indices [m], their logits r[experts] [m] exactly,
and one value ``rest`` given back to each of the N - m experts not stored. ``rest`` is chosen
so the dense score the mixing reads (``RoutingMap.scores``) keeps what matters exactly:

- softmax routers: ``rest = log mean exp(r_missing)``. The softmax denominator
  ``sum exp(r)`` is unchanged, so every stored expert's probability is exact and the missing
  experts' total probability is exact; only how that total is spread among them is lost
  (spread evenly, the maximum-entropy guess).
- sigmoid routers: ``rest = logit(mean sigmoid(r_missing))``: each stored expert's score is
  exact and the missing experts' total score is exact, spread evenly.

Either way ``rest`` lies between the smallest and the largest missing logit, so below every
stored one: the rebuilt row ranks the stored experts first in their own order, and the
model's top-k of it (softmax routers; k <= m) is the original's with the original weights.
The ``topk`` mixing blends dense scores, so a neighbour's stored experts enter the blend
exactly and each missing expert's score is off by at most the largest missing score: the
blend picks other experts only where two experts' blended scores are that close. Where the
missing logits are equal (the gradient step left them alone and they started equal) the
rebuilt row is the original row. Framework-free (NumPy).
"""

from __future__ import annotations

import numpy as np

SCORES = ("softmax", "sigmoid")


def expert_dtype(num_experts: int) -> np.dtype:
    """uint8 indices up to 256 experts, int16 above (both frameworks read them)."""
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


def rest_logits(missing: np.ndarray, score: str) -> np.ndarray:
    """The one logit [M] that stands for the missing logits [M, N - m] (module docstring)."""
    x = missing.astype(np.float64)
    if score == "softmax":
        top = x.max(axis=1)
        return (top + np.log(np.exp(x - top[:, None]).mean(axis=1))).astype(np.float32)
    if score == "sigmoid":
        p = np.clip((1.0 / (1.0 + np.exp(-x))).mean(axis=1), 1e-12, 1.0 - 1e-12)
        return (np.log(p) - np.log1p(-p)).astype(np.float32)
    raise ValueError(f"unknown router score {score!r}; expected one of {SCORES}")


def top_values(logits: np.ndarray, m: int, score: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense logits [M, N] as (expert indices [M, m], their logits [M, m], rest [M])."""
    n = logits.shape[1]
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m < n:
        raise ValueError(f"top experts must be an integer in [1, {n - 1}] (N = {n}), got {m!r}")
    logits = logits.astype(np.float32)
    experts = np.argpartition(-logits, m - 1, axis=1)[:, :m]
    top = np.take_along_axis(logits, experts, axis=1)
    stored = np.zeros(logits.shape, bool)
    np.put_along_axis(stored, experts, True, axis=1)
    missing = logits[~stored].reshape(len(logits), n - m)
    return experts.astype(expert_dtype(n)), top, rest_logits(missing, score)


def dense_values(
    experts: np.ndarray, top: np.ndarray, rest: np.ndarray, num_experts: int
) -> np.ndarray:
    """The dense rows [M, N] float32 that top-m values stand for."""
    out = np.repeat(rest.astype(np.float32)[:, None], num_experts, axis=1)
    np.put_along_axis(out, experts.astype(np.int64), top.astype(np.float32), axis=1)
    return out
