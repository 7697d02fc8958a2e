"""The router wrapper: the model's own routing, plus retrieval from the memory and mixing.

``attach`` (attach.py) swaps each MoE block's gate module for a ``KNNRouter`` (and its experts
module for a ``KNNExperts``, which the ``union`` mode needs). The model's own code still runs
its routing map on what the wrapper returns, so quantised and LoRA routers, shared experts and
scaling all keep working. Tokens whose confidence lambda is 0 take the model's own values
through ``mx.where``, so they are bit-identical to the plain model.

The wrapper does inference only. Its public state is plain Python objects (never parameters):
``memory`` (a LayerMemory or None), ``config``, ``stats`` (RoutingStats or None) and ``tap``,
one callable ``tap(x, z)`` that sees the router inputs and logits of every call and may return
logits that replace the router's (the builder's capture and gradient hooks use it).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..arch.routing import RoutingMap
from ..config import KNNConfig
from .layer_memory import LayerMemory
from .mixing import blend, router_confident
from .routing_stats import RoutingStats

Tap = Callable[[mx.array, mx.array], "mx.array | None"]


class KNNRouter(nn.Module):
    def __init__(self, inner: nn.Module, routing: RoutingMap, returns: str, layer: int):
        super().__init__()
        self.inner = inner
        self.routing = routing
        self.returns = returns  # "logits", or "assignment": the gate returns (indices, weights)
        self.layer = layer
        self.memory: LayerMemory | None = None
        self.config = KNNConfig()
        self.stats: RoutingStats | None = None
        self.tap: Tap | None = None
        self._pending = None  # union mode: what KNNExperts adds to this call's output

    def __call__(self, x: mx.array):
        own = self.inner(x)
        if self.memory is None and self.tap is None:
            return own  # installed but idle: no extra work on the hot path
        # assignment gates return (indices, weights); their logits are x W^T
        z = x @ self.inner.weight.T if self.returns == "assignment" else own
        if self.tap is not None:
            replaced = self.tap(x, z)
            if replaced is not None:
                return self.replace_logits(replaced.reshape(z.shape))
        mem, cfg = self.memory, self.config
        if mem is None or cfg.lambda_scale == 0:
            return own
        lead, n = z.shape[:-1], z.shape[-1]
        zf = z.reshape(-1, n)
        idx, w, lam = mem.retrieve(x.reshape(-1, x.shape[-1]), cfg)
        if cfg.skip is not None:  # selective retrieval: confident tokens keep their routing
            sure = router_confident(self.routing.scores(zf), cfg.skip, cfg.skip_threshold)
            lam = mx.where(sure, 0.0, lam)
        active = lam > 0
        if cfg.mix == "union":
            return self._union(z, own, idx, w, lam)
        if cfg.mix == "logits":
            mixed = blend(zf.astype(mx.float32), lam, w, mem.neighbour_logits(idx))
        else:  # topk: blend dense scores, give the model the logits of the blend
            blended = blend(self.routing.scores(zf), lam, w, mem.neighbour_scores(idx))
            mixed = self.routing.inverse(blended)
        if self.stats is not None:
            own_set = mx.sort(self.routing.select(zf)[0], axis=-1)
            new_set = mx.sort(self.routing.select(mixed)[0], axis=-1)
            self.stats.add(lam, ~(own_set == new_set).all(axis=-1) & active)
        if self.returns == "logits":
            out = mx.where(active[:, None], mixed.astype(z.dtype), zf)
            return out.reshape(z.shape)
        inds, weights = self.routing.select(mixed.reshape(*lead, n))
        own_inds, own_weights = own
        keep = active.reshape(lead)[..., None]
        return mx.where(keep, inds, own_inds), mx.where(
            keep, weights.astype(own_weights.dtype), own_weights
        )

    def replace_logits(self, r: mx.array):
        """What the gate returns when logits ``r`` replace x W_r: r itself, or the model's
        own map on r for gates that return an assignment."""
        return r if self.returns == "logits" else self.routing.select(r)

    def _union(self, z, own, idx, w, lam):
        inds, weights = self.memory.assignment()
        t = idx.shape[0]
        mem_inds = inds[idx].reshape(t, -1)  # [T, K*k]
        mem_weights = (w[..., None] * weights[idx]).reshape(t, -1)
        if self.returns == "logits":
            own_inds, own_weights = self.routing.select(z.reshape(-1, z.shape[-1]))
        else:
            own_inds, own_weights = (a.reshape(-1, a.shape[-1]) for a in own)
        self._pending = (lam, mem_inds, mem_weights, own_weights.sum(axis=-1))
        if self.stats is not None:
            novel = ~(mem_inds[..., None] == own_inds[:, None, :]).any(axis=-1)
            self.stats.add(lam, (novel & (mem_weights > 0)).any(axis=-1) & (lam > 0))
        return own

    def take_pending(self):
        """The union mode's memory experts for this call (once), or None."""
        pending, self._pending = self._pending, None
        return pending


class KNNExperts(nn.Module):
    """Adds the memory's experts in ``union`` mode; passes through otherwise.

    The block computes ``sum_i s_i y_i`` over its own k experts. Returning
    ``y_i' = (1 - lambda) y_i + lambda m / S`` with ``S = sum_i s_i`` and ``m`` the memory's
    weighted expert output makes that sum ``(1 - lambda) a(x) + lambda a_mem(x)`` applied to
    the experts, without touching the block's code.
    """

    def __init__(self, inner: nn.Module, router: KNNRouter):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "router", router)  # a reference, not a child module

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        y = self.inner(x, indices)
        pending = self.router.take_pending()
        if pending is None:
            return y
        lam, mem_inds, mem_weights, own_sum = pending
        lead = indices.shape[:-1]
        y_mem = self.inner(x, mem_inds.reshape(*lead, -1))
        m = (y_mem * mem_weights.reshape(*lead, -1)[..., None]).sum(axis=-2)
        lam = lam.reshape(*lead, 1, 1)
        scale = lam / own_sum.reshape(*lead, 1, 1)
        mixed = (1.0 - lam) * y + scale * m[..., None, :]
        return mx.where(lam > 0, mixed.astype(y.dtype), y)
