"""The router wrapper: the model's own routing, plus retrieval from the memory and mixing.

``attach`` swaps each MoE block's gate module for a ``KNNRouter`` (and its experts module for
a ``KNNExperts``, which the ``union`` mode needs); ``detach`` puts the originals back. The
model's own code still runs its routing map on what the wrapper returns, so quantised and
LoRA routers, shared experts and scaling all keep working. Tokens whose confidence lambda is
0 take the model's own values through ``mx.where``, so they are bit-identical to the plain
model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .arch import RouterSpec, RoutingMap, get_path, moe_layers, set_path, spec_for
from .config import KNNConfig
from .mixing import blend, router_confident
from .retrieval import LayerMemory


def routing_map(spec: RouterSpec, block: nn.Module) -> RoutingMap:
    gate = get_path(block, spec.gate)
    return spec.routing(block, getattr(gate, "inner", gate))


class KNNRouter(nn.Module):
    def __init__(self, inner: nn.Module, rmap: RoutingMap, returns: str, layer: int):
        super().__init__()
        self.inner = inner
        self._rmap = rmap
        self._returns = returns
        self._layer = layer
        self._memory: LayerMemory | None = None
        self._config = KNNConfig()
        self._pending = None  # union mode: what KNNExperts adds to this call's output
        self._stats: list | None = None
        self._capture: list | None = None
        self._free: mx.array | None = None  # builder: free logits r replacing the output
        self._offset: mx.array | None = None  # builder: r = stop_gradient(z) + offset

    # -- the model's own router ------------------------------------------------------------
    def __call__(self, x: mx.array):
        own = self.inner(x)
        if self._memory is None and self._capture is None and not self._building():
            return own  # installed but idle: no extra work on the hot path
        # assignment gates return (indices, weights); their logits are x W^T
        z = x @ self.inner.weight.T if self._returns == "assignment" else own
        if self._capture is not None:
            self._capture.append((x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])))
        if self._free is not None:
            return self._replace_logits(self._free.reshape(z.shape))
        if self._offset is not None:
            r = mx.stop_gradient(z).astype(mx.float32) + self._offset.reshape(z.shape)
            return self._replace_logits(r)
        mem, cfg = self._memory, self._config
        if mem is None or cfg.lambda_scale == 0:
            return own
        lead, n = z.shape[:-1], z.shape[-1]
        zf = z.reshape(-1, n)
        idx, w, lam = mem.retrieve(x.reshape(-1, x.shape[-1]), cfg)
        if cfg.skip is not None:  # selective retrieval: confident tokens keep their routing
            sure = router_confident(self._rmap.scores(zf), cfg.skip, cfg.skip_threshold)
            lam = mx.where(sure, 0.0, lam)
        active = lam > 0
        if cfg.mix == "union":
            return self._union(z, own, idx, w, lam)
        if cfg.mix == "logits":
            mixed = blend(zf.astype(mx.float32), lam, w, mem.logits[idx])
        else:  # topk: blend dense scores, give the model the logits of the blend
            blended = blend(self._rmap.scores(zf), lam, w, mem.scores()[idx])
            mixed = self._rmap.inverse(blended)
        if self._stats is not None:
            self._record(lam, self._rmap.select(zf)[0], self._rmap.select(mixed)[0])
        if self._returns == "logits":
            out = mx.where(active[:, None], mixed.astype(z.dtype), zf)
            return out.reshape(z.shape)
        inds, weights = self._rmap.select(mixed.reshape(*lead, n))
        own_inds, own_weights = own
        keep = active.reshape(lead)[..., None]
        return mx.where(keep, inds, own_inds), mx.where(
            keep, weights.astype(own_weights.dtype), own_weights
        )

    def _building(self) -> bool:
        return self._free is not None or self._offset is not None

    def _replace_logits(self, r):
        """The builder's logits r replace x W_r; the model's own map runs on them."""
        return r if self._returns == "logits" else self._rmap.select(r)

    def _union(self, z, own, idx, w, lam):
        mem_inds, mem_weights = self._mem_assignment(idx, w)
        if self._returns == "logits":
            own_inds, own_weights = self._rmap.select(z.reshape(-1, z.shape[-1]))
        else:
            own_inds, own_weights = (a.reshape(-1, a.shape[-1]) for a in own)
        self._pending = (lam, mem_inds, mem_weights, own_weights.sum(axis=-1))
        if self._stats is not None:
            novel = ~(mem_inds[..., None] == own_inds[:, None, :]).any(axis=-1)
            self._record_changed(lam, (novel & (mem_weights > 0)).any(axis=-1) & (lam > 0))
        return own

    def _mem_assignment(self, idx, w):
        inds, weights = self._memory.assignment()
        t = idx.shape[0]
        mem_inds = inds[idx].reshape(t, -1)  # [T, K*k]
        mem_weights = (w[..., None] * weights[idx]).reshape(t, -1)
        return mem_inds, mem_weights

    # -- statistics ------------------------------------------------------------------------
    def _record(self, lam, own_inds, new_inds):
        same = (mx.sort(own_inds, axis=-1) == mx.sort(new_inds, axis=-1)).all(axis=-1)
        self._record_changed(lam, ~same & (lam > 0))

    def _record_changed(self, lam, changed):
        self._stats.append((lam.sum(), changed.sum(), lam.size))

    def stats(self) -> dict:
        if not self._stats:
            return {"tokens": 0, "mean_lambda": 0.0, "changed_share": 0.0}
        lam = sum(float(s[0]) for s in self._stats)
        changed = sum(int(s[1]) for s in self._stats)
        tokens = sum(s[2] for s in self._stats)
        return {"tokens": tokens, "mean_lambda": lam / tokens, "changed_share": changed / tokens}


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
        object.__setattr__(self, "_router", router)  # a reference, not a child module

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        y = self.inner(x, indices)
        pending, self._router._pending = self._router._pending, None
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


# -- installing and removing ---------------------------------------------------------------
def _routers(model: nn.Module) -> dict[int, KNNRouter]:
    return getattr(model, "_knnmoe_routers", {})


def install(model: nn.Module) -> dict[int, KNNRouter]:
    """Wrap every MoE router of ``model`` (idempotent). Without a memory nothing changes."""
    routers = _routers(model)
    if routers:
        return routers
    spec = spec_for(model)
    for layer, block in moe_layers(model).items():
        gate = get_path(block, spec.gate)
        router = KNNRouter(gate, routing_map(spec, block), spec.gate_returns, layer)
        set_path(block, spec.gate, router)
        set_path(block, spec.experts, KNNExperts(get_path(block, spec.experts), router))
        routers[layer] = router
    object.__setattr__(model, "_knnmoe_routers", routers)
    return routers


def attach(model: nn.Module, memory, config: KNNConfig | None = None, validate: bool = True):
    """Attach ``memory`` (a Memory or a path) to ``model``; returns the config in use.

    Layers the memory lacks keep their plain router. ``config`` defaults to the memory's
    recorded retrieval settings.
    """
    from .memory import Memory

    if not isinstance(memory, Memory):
        memory = Memory.load(memory)
    if validate:
        memory.validate(model)
    config = config or KNNConfig.from_memory_defaults(memory.retrieval)
    routers = install(model)
    cache_dir = Path(str(memory.path) + ".hnsw") if memory.path else None
    for layer, router in routers.items():
        router._memory = None
        if layer in memory.keys:
            router._memory = LayerMemory.from_memory(memory, layer, router._rmap, cache_dir)
        router._config = config
    return config


def configure(model: nn.Module, **changes) -> KNNConfig:
    """Change retrieval settings of an attached model (None values are ignored)."""
    routers = _routers(model)
    if not routers:
        raise ValueError("no memory is attached to this model")
    config = next(iter(routers.values()))._config.updated(**changes)
    for router in routers.values():
        router._config = config
    return config


def detach(model: nn.Module) -> nn.Module:
    """Restore the original gate and experts modules exactly."""
    routers = _routers(model)
    if not routers:
        return model
    spec = spec_for(model)
    blocks = moe_layers(model)
    for layer, block in blocks.items():
        set_path(block, spec.gate, routers[layer].inner)
        set_path(block, spec.experts, get_path(block, spec.experts).inner)
    object.__delattr__(model, "_knnmoe_routers")
    return model


def set_stats(model: nn.Module, enabled: bool = True) -> None:
    """Start (and reset) or stop collecting per-layer routing statistics."""
    for router in _routers(model).values():
        router._stats = [] if enabled else None


def knn_stats(model: nn.Module) -> dict[int, dict]:
    """Per MoE layer: tokens seen, mean lambda, share of tokens whose experts changed."""
    return {layer: r.stats() for layer, r in _routers(model).items() if r._memory is not None}


class capture_router_inputs:
    """Context manager recording (router input [T, d], router logits [T, N]) per MoE layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: dict[int, list] = {}

    def __enter__(self):
        for layer, router in install(self.model).items():
            router._capture = self.records.setdefault(layer, [])
        return self.records

    def __exit__(self, *exc):
        for router in _routers(self.model).values():
            router._capture = None
