"""Memory construction: teacher-forced forward, then S gradient steps on the routing logits.

For a batch of token sequences with loss masks, every MoE router's output is replaced by
logits ``r`` and ``mx.value_and_grad`` of the summed next-token NLL of the target tokens with
respect to all ``r`` gives, in one backward pass, the gradient for every position and every
MoE layer (METHOD.md, step 3).

The first step adds a zero offset to ``stop_gradient(z)`` inside each router, so one pass
returns the router inputs ``x``, the router logits ``z`` and the gradient together. Later steps
(S > 1) use free logits: changing an early layer's ``r`` changes later router inputs but not
later ``r``, exactly as "r replaces x W_r" means. With S = 1 the gradient does not depend on
eta, so ``r = z - eta * g`` for every eta of a grid comes from one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .arch import get_path, model_type, moe_layers, spec_for
from .router import capture_router_inputs, install, routing_map

SCOPES = ("sequence", "token")


@dataclass
class BatchResult:
    keys: dict[int, mx.array]  # router inputs of the kept positions [P, d]
    router_logits: dict[int, mx.array]  # the router's own z [P, N]
    logits: dict[float, dict[int, mx.array]]  # eta -> layer -> optimised r^(S) [P, N]
    loss_before: float  # summed target NLL of the plain model (teacher-forced)
    targets: int


def target_nll(model: nn.Module, tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """Summed NLL of tokens[:, t] where loss_mask[:, t] is 1, predicted from position t-1."""
    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="none")
    return (ce * loss_mask[:, 1:]).sum()


def _set(routers, layers, attr, values) -> None:
    for layer, value in zip(layers, values):
        setattr(routers[layer], attr, value)


def free_logits_nll(model, tokens, loss_mask, free: list[mx.array]) -> mx.array:
    """The target NLL with each MoE layer's router output replaced by ``free`` [B*(L-1), N]."""
    routers = install(model)
    layers = sorted(routers)
    _set(routers, layers, "_free", free)
    try:
        return target_nll(model, tokens, loss_mask)
    finally:
        _set(routers, layers, "_free", [None] * len(layers))


def free_logits_grad(model, tokens, loss_mask, free: list[mx.array]):
    """(NLL, dNLL/dr for every MoE layer) in one backward pass."""
    return mx.value_and_grad(lambda r: free_logits_nll(model, tokens, loss_mask, r))(free)


def first_step(model, tokens, loss_mask):
    """One forward+backward: (NLL, router inputs x, router logits z, dNLL/dr at r = z)."""
    routers = install(model)
    layers = sorted(routers)

    def loss_fn(offsets):
        _set(routers, layers, "_offset", offsets)
        try:
            with capture_router_inputs(model) as records:
                loss = target_nll(model, tokens, loss_mask)
        finally:
            _set(routers, layers, "_offset", [None] * len(layers))
        return loss, [records[layer][0] for layer in layers]

    rows = tokens.shape[0] * (tokens.shape[1] - 1)
    zeros = [mx.zeros((rows, routers[layer]._rmap.n_experts)) for layer in layers]
    (loss, captured), grads = mx.value_and_grad(loss_fn)(zeros)
    x = {layer: mx.stop_gradient(c[0]) for layer, c in zip(layers, captured)}
    z = {layer: mx.stop_gradient(c[1]).astype(mx.float32) for layer, c in zip(layers, captured)}
    return loss, x, z, dict(zip(layers, grads))


@contextmanager
def token_scope(model: nn.Module):
    """Detach attention keys and values: each position's gradient comes from its own loss."""
    swapped = []
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        for name in ("k_proj", "v_proj", "kv_a_proj_with_mqa"):
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
def dense_surrogate(model: nn.Module, k: int):
    """Route to ``k`` experts (no group limit) so the gradient can reach unselected experts."""
    spec = spec_for(model)
    routers = install(model)
    changed, maps = [], {}
    for layer, block in moe_layers(model).items():
        if model_type(model) == "phimoe":
            raise ValueError("dense surrogate: PhiMoE's sparsemixer is defined for top-2 only")
        gate = get_path(block, spec.gate)
        n = routers[layer]._rmap.n_experts
        if not 1 <= k <= n:
            raise ValueError(f"dense surrogate: k' must be in 1..{n}, got {k}")
        for obj in (block, getattr(gate, "inner", gate), getattr(block, "router", None)):
            for attr in ("top_k", "num_experts_per_tok"):
                if obj is not None and isinstance(getattr(obj, attr, None), int):
                    changed.append((obj, attr, getattr(obj, attr)))
                    setattr(obj, attr, k)
            if getattr(obj, "topk_group", None) is not None:
                changed.append((obj, "topk_group", obj.topk_group))
                obj.topk_group = obj.n_group
        maps[layer] = routers[layer]._rmap
        routers[layer]._rmap = routing_map(spec, block)
    try:
        yield
    finally:
        for obj, attr, value in reversed(changed):
            setattr(obj, attr, value)
        for layer, rmap in maps.items():
            routers[layer]._rmap = rmap


def auto_surrogate(model: nn.Module) -> int | None:
    """The dense surrogate the builder uses by default: k' = min(N, 4k) where the routing map
    gives unselected experts exactly zero gradient (renormalised top-k, top-k then softmax,
    sigmoid selection), so a plain step could only reweight the selected experts; none where
    unselected experts already get a gradient (softmax top-k without renormalisation) and for
    PhiMoE. On the bundled qwen3_moe, k' = 4k gave the whole gain of k' = N (EXPERIMENTS.md).
    The map is probed numerically on random logits, so every architecture is covered alike."""
    if model_type(model) == "phimoe":
        return None
    router = next(iter(install(model).values()))
    rmap = router._rmap
    z = mx.random.normal((4, rmap.n_experts), key=mx.random.key(0))
    c = mx.random.normal((4, rmap.top_k), key=mx.random.key(1))
    grad = mx.grad(lambda v: (rmap.select(v)[1] * c).sum())(z)
    selected = mx.zeros_like(z).astype(mx.bool_)
    selected = mx.put_along_axis(selected, rmap.select(z)[0], mx.array(True), axis=-1)
    unselected = mx.where(selected, 0.0, mx.abs(grad)).max().item()
    return surrogate_rule(unselected, mx.abs(grad).max().item(), rmap.n_experts, rmap.top_k)


def surrogate_rule(unselected: float, largest: float, n_experts: int, top_k: int) -> int | None:
    """k' from a gradient probe (framework-free, shared with the PyTorch reference): 4k capped
    at N when the largest |gradient| on unselected experts is float rounding, else None."""
    if unselected > 1e-5 * largest:
        return None
    return min(n_experts, 4 * top_k)


def resolve_surrogate(
    model: nn.Module, surrogate: int | str | None, auto: Callable | None = None
) -> int | None:
    """``"auto"`` -> ``auto(model)`` (``auto_surrogate``; the PyTorch reference passes its
    own); 0, None or ``"off"`` -> no surrogate; an int as is."""
    if surrogate == "auto":
        return (auto or auto_surrogate)(model)
    if surrogate in (None, 0, "off"):
        return None
    if isinstance(surrogate, int):
        return surrogate
    raise ValueError(f"dense surrogate must be an int, 'auto' or 'off', got {surrogate!r}")


def optimise_batch(
    model: nn.Module,
    tokens: mx.array,
    loss_mask: mx.array,
    keep_mask: mx.array,
    etas: list[float],
    steps: int = 1,
    scope: str = "sequence",
    surrogate: int | None = None,
) -> BatchResult:
    """S steps of r <- r - eta * grad_r NLL, for each eta, on one batch [B, L] (right-padded).

    ``keep_mask`` [B, L] marks positions to store; the last position of a row has no
    successor in the forward and is never stored.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if surrogate:  # keys and r's start are the plain model's; only the gradient pass differs
        x, z = _plain_capture(model, tokens)
        with _gradient_context(model, scope, surrogate):
            loss, grads = free_logits_grad(model, tokens, loss_mask, [z[i] for i in sorted(z)])
        grad = dict(zip(sorted(z), grads))
    else:
        with _gradient_context(model, scope, None):
            loss, x, z, grad = first_step(model, tokens, loss_mask)
    layers = sorted(z)
    mx.eval(loss, x, z, grad)
    with _gradient_context(model, scope, surrogate):
        logits = {}
        for eta in etas:
            free = [z[layer] - eta * grad[layer] for layer in layers]
            for _ in range(steps - 1):
                _, grads = free_logits_grad(model, tokens, loss_mask, free)
                free = [r - eta * g for r, g in zip(free, grads)]
                mx.eval(free)
            logits[eta] = dict(zip(layers, free))
    keep = mx.array(keep_mask[:, :-1].reshape(-1).astype(mx.bool_)).tolist()
    idx = mx.array([i for i, k in enumerate(keep) if k], dtype=mx.int32)
    return BatchResult(
        keys={layer: x[layer][idx] for layer in layers},
        router_logits={layer: z[layer][idx] for layer in layers},
        logits={eta: {layer: r[idx] for layer, r in rs.items()} for eta, rs in logits.items()},
        loss_before=float(loss),
        targets=int(loss_mask[:, 1:].sum()),
    )


def _plain_capture(model, tokens):
    with capture_router_inputs(model) as records:
        mx.eval(model(tokens[:, :-1]))
    x = {layer: mx.concatenate([r[0] for r in rec]) for layer, rec in records.items()}
    z = {layer: mx.concatenate([r[1] for r in rec]) for layer, rec in records.items()}
    return x, {layer: v.astype(mx.float32) for layer, v in z.items()}


@contextmanager
def _gradient_context(model, scope, surrogate):
    with token_scope(model) if scope == "token" else _nothing():
        with dense_surrogate(model, surrogate) if surrogate else _nothing():
            yield


@contextmanager
def _nothing():
    yield
