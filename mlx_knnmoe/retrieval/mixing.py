"""The arithmetic of kNN-MoE mixing (docs/METHOD.md, "Online"), as pure functions on MLX arrays.

Shapes: T tokens, K neighbours, N experts. Neighbour distances come from ``search``: squared
L2 distance for ``rbf``, cosine for ``cosine``. ``weights_and_confidence`` and ``blend`` are
compiled with ``mx.compile``, so their element-wise work fuses (one trace per shape: with
``shapeless=True`` MLX 0.32.4 crashes on this graph on the CPU, so they are not shapeless
yet; none of them reads a shape into a constant, so they can become so).
"""

from __future__ import annotations

import functools
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


def _count(sim: mx.array) -> mx.array:
    """K as an array computed at run time (a shapeless trace must not bake it in)."""
    return mx.ones_like(sim).sum(axis=-1, keepdims=True)


def confidence(sim: mx.array, scale: float | mx.array) -> mx.array:
    """lambda = clip(scale * mean_j s_j, 0, 1), shape [T]."""
    mean = (sim.sum(axis=-1, keepdims=True) / _count(sim)).squeeze(-1)
    return mx.clip(scale * mean, 0.0, 1.0)


def neighbour_weights(sim: mx.array) -> mx.array:
    """w_j = s_j / sum_j s_j; uniform where every similarity is 0 (lambda is 0 there)."""
    total = sim.sum(axis=-1, keepdims=True)
    return mx.where(total > 0, sim / mx.maximum(total, 1e-30), 1.0 / _count(sim))


@functools.cache  # compiled on first use: compiled functions built at import abort the
def _weights_and_confidence(kind: str):  # server's exit (MLX 0.32.4, generation thread)
    def run(dist: mx.array, bandwidth: mx.array, scale: mx.array):
        sim = similarity(dist, kind, bandwidth)
        return neighbour_weights(sim), confidence(sim, scale)

    return mx.compile(run)


def weights_and_confidence(
    dist: mx.array, kind: str, bandwidth: float, scale: float
) -> tuple[mx.array, mx.array]:
    """Neighbour weights [T, K] and lambda [T] from distances, as one compiled step."""
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity '{kind}'; expected one of {SIMILARITIES}")
    return _weights_and_confidence(kind)(
        dist, mx.array(bandwidth, mx.float32), mx.array(scale, mx.float32)
    )


def _blend(own: mx.array, lam: mx.array, weights: mx.array, neighbours: mx.array) -> mx.array:
    mem = (weights[..., None] * neighbours).sum(axis=1)
    lam = lam[:, None]
    return (1.0 - lam) * own + lam * mem


def blend(own: mx.array, lam: mx.array, weights: mx.array, neighbours: mx.array) -> mx.array:
    """(1 - lambda) own + lambda sum_j w_j neighbours_j, for own [T, N], neighbours [T, K, N]."""
    return _compiled_blend()(own, lam, weights, neighbours)


@functools.cache
def _compiled_blend():
    return mx.compile(_blend)


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
