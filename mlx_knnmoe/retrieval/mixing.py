"""The arithmetic of kNN-MoE mixing (docs/METHOD.md, "Online"), as pure functions on MLX arrays.

Shapes: T tokens, K neighbours, N experts. Neighbour distances come from ``search``: squared
L2 distance for ``rbf``, cosine for ``cosine``.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..config import SIMILARITIES


def similarity(dist: mx.array, kind: str, bandwidth: float) -> mx.array:
    """Similarity in [0, 1]: exp(-d^2 / tau) for rbf, max(0, cos) for cosine."""
    if kind == "rbf":
        return mx.exp(-mx.maximum(dist, 0.0) / bandwidth)
    if kind == "cosine":
        return mx.clip(dist, 0.0, 1.0)
    raise ValueError(f"unknown similarity '{kind}'; expected one of {SIMILARITIES}")


def confidence(sim: mx.array, scale: float) -> mx.array:
    """lambda = clip(scale * mean_j s_j, 0, 1), shape [T]."""
    return mx.clip(scale * sim.mean(axis=-1), 0.0, 1.0)


def neighbour_weights(sim: mx.array) -> mx.array:
    """w_j = s_j / sum_j s_j; uniform where every similarity is 0 (lambda is 0 there)."""
    total = sim.sum(axis=-1, keepdims=True)
    uniform = mx.full(sim.shape, 1.0 / sim.shape[-1], dtype=sim.dtype)
    return mx.where(total > 0, sim / mx.maximum(total, 1e-30), uniform)


def blend(own: mx.array, lam: mx.array, weights: mx.array, neighbours: mx.array) -> mx.array:
    """(1 - lambda) own + lambda sum_j w_j neighbours_j, for own [T, N], neighbours [T, K, N]."""
    mem = (weights[..., None] * neighbours).sum(axis=1)
    lam = lam[:, None]
    return (1.0 - lam) * own + lam * mem


def router_confident(scores: mx.array, signal: str, threshold: float) -> mx.array:
    """[T] True where the router's own dense scores [T, N] are confident by ``signal``.

    ``entropy``: entropy of the normalised scores divided by log N is below ``threshold``.
    ``margin``: the largest score minus the second largest is above ``threshold``.
    """
    if signal == "entropy":
        p = scores / mx.maximum(scores.sum(axis=-1, keepdims=True), 1e-30)
        h = -(p * mx.log(mx.maximum(p, 1e-30))).sum(axis=-1)
        return h / math.log(scores.shape[-1]) < threshold
    if signal == "margin":
        top2 = mx.sort(mx.topk(scores, 2, axis=-1), axis=-1)  # topk's order is unspecified
        return (top2[..., 1] - top2[..., 0]) > threshold
    raise ValueError(f"unknown skip signal '{signal}'; expected entropy or margin")
