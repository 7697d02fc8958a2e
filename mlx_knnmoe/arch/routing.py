"""Routing maps: router logits ``z`` [..., N] to the sparse assignment a model uses, expert
indices [..., k] and their weights [..., k], plus the dense score the logits stand for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

Select = Callable[[mx.array], "tuple[mx.array, mx.array]"]


@dataclass
class RoutingMap:
    n_experts: int
    top_k: int
    score: str  # "softmax" or "sigmoid": the dense score the router's logits stand for
    select: Select  # logits [..., N] -> (indices [..., k], weights [..., k])

    def scores(self, logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if self.score == "sigmoid":
            return mx.sigmoid(logits)
        return mx.softmax(logits, axis=-1, precise=True)

    def inverse(self, scores: mx.array) -> mx.array:
        """Logits whose dense score is ``scores`` (log p for softmax, logit(s) for sigmoid)."""
        eps = 1e-30
        if self.score == "sigmoid":
            s = mx.clip(scores, eps, 1.0 - 1e-7)
            return mx.log(s) - mx.log1p(-s)
        return mx.log(mx.maximum(scores, eps))


def softmax_topk(k: int, n: int, norm: bool) -> RoutingMap:
    def select(z):
        p = mx.softmax(z, axis=-1, precise=True)
        inds = mx.stop_gradient(mx.argpartition(-p, kth=k - 1, axis=-1)[..., :k])
        w = mx.take_along_axis(p, inds, axis=-1)
        if norm:
            w = w / w.sum(axis=-1, keepdims=True)
        return inds, w

    return RoutingMap(n, k, "softmax", select)


def topk_softmax(k: int, n: int) -> RoutingMap:
    def select(z):
        inds = mx.stop_gradient(mx.argpartition(-z, kth=k - 1, axis=-1)[..., :k])
        w = mx.softmax(mx.take_along_axis(z, inds, axis=-1), axis=-1, precise=True)
        return inds, w

    return RoutingMap(n, k, "softmax", select)
