"""How the model runs during the gradient pass: the token scope (attention keys and values
detached) and the dense surrogate (more experts routed so unselected ones get a gradient)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..arch.specs import (
    KV_PROJECTIONS,
    TOP_K_ATTRS,
    get_path,
    model_type,
    moe_layers,
    own_gate,
    routing_map,
    spec_for,
)
from ..retrieval.attach import installed
from .plan import gradient_pass, overridden, surrogate_rule


@contextmanager
def gradient_context(model: nn.Module, scope: str, surrogate: int | None) -> Iterator[None]:
    """The token scope when ``scope == "token"``, the dense surrogate when ``surrogate``."""
    with gradient_pass(
        scope, surrogate, lambda: token_scope(model), partial(dense_surrogate, model)
    ):
        yield


@contextmanager
def token_scope(model: nn.Module):
    """Detach attention keys and values: each position's gradient comes from its own loss."""
    swapped = []
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        for name in KV_PROJECTIONS:
            if attn is not None and name in attn:
                swapped.append((attn, name, attn[name]))
                attn[name] = _Detached(attn[name])
    if not swapped:
        raise ValueError("token scope: found no attention key/value projections in this model")
    try:
        yield
    finally:
        for attn, name, module in swapped:
            attn[name] = module


class _Detached(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return mx.stop_gradient(self.inner(x))


@contextmanager
def dense_surrogate(model: nn.Module, k: int) -> Iterator[None]:
    """Route to ``k`` experts (no group limit) so the gradient can reach unselected experts."""
    if model_type(model) == "phimoe":
        raise ValueError("dense surrogate: PhiMoE's sparsemixer is defined for top-2 only")
    spec = spec_for(model)
    with installed(model) as routers:
        n = next(iter(routers.values())).routing.n_experts
        if not 1 <= k <= n:
            raise ValueError(f"dense surrogate: k' must be in 1..{n}, got {k}")
        limits = []
        for block in moe_layers(model).values():
            gate = own_gate(get_path(block, spec.gate))
            for obj in (block, gate, getattr(block, "router", None)):
                for attr in TOP_K_ATTRS:
                    if obj is not None and isinstance(getattr(obj, attr, None), int):
                        limits.append((obj, attr, k))
                if getattr(obj, "topk_group", None) is not None:
                    limits.append((obj, "topk_group", obj.n_group))
        with overridden(limits):
            blocks = moe_layers(model)
            maps = [(routers[i], "routing", routing_map(spec, blocks[i])) for i in routers]
            with overridden(maps):
                yield


def auto_surrogate(model: nn.Module) -> int | None:
    """The dense surrogate the builder uses by default: k' = min(N, 4k) where the routing map
    gives unselected experts exactly zero gradient (renormalised top-k, top-k then softmax,
    sigmoid selection), so a plain step could only reweight the selected experts; none where
    unselected experts already get a gradient (softmax top-k without renormalisation) and for
    PhiMoE. On the bundled qwen3_moe, k' = 4k gave the whole gain of k' = N (EXPERIMENTS.md).
    The map is probed numerically on random logits, so every architecture is covered alike."""
    if model_type(model) == "phimoe":
        return None
    spec = spec_for(model)
    rmap = routing_map(spec, next(iter(moe_layers(model).values())))
    z = mx.random.normal((4, rmap.n_experts), key=mx.random.key(0))
    c = mx.random.normal((4, rmap.top_k), key=mx.random.key(1))
    grad = mx.grad(lambda v: (rmap.select(v)[1] * c).sum())(z)
    selected = mx.zeros_like(z).astype(mx.bool_)
    selected = mx.put_along_axis(selected, rmap.select(z)[0], mx.array(True), axis=-1)
    unselected = mx.where(selected, 0.0, mx.abs(grad)).max().item()
    return surrogate_rule(unselected, mx.abs(grad).max().item(), rmap.n_experts, rmap.top_k)
