"""Memory construction in torch: teacher-forced forward, then S gradient steps on the routing
logits (mirrors ``mlx_knnmoe.build.gradient``).

Every MoE router's output is replaced by logits ``r``; one ``torch.autograd.grad`` of the
summed next-token NLL of the target tokens gives dNLL/dr for every position and MoE layer.
The first step adds zero offsets to ``z.detach()`` inside each router, so one pass returns
the router inputs ``x``, the router logits ``z`` and the gradient together. Later steps
(S > 1) use free logits: changing an early layer's ``r`` changes later router inputs but not
later ``r``. With S = 1, ``r = z - eta * g`` for every eta of a grid comes from one pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..build.plan import BatchResult, gradient_pass, gradient_steps, overridden, surrogate_rule
from ..config import SCOPES
from .arch import (
    KV_PROJECTIONS,
    decoder_layers,
    model_type,
    moe_blocks,
    routing_map,
    spec_for,
)
from .router import capture_router_inputs, install


def target_nll(model: nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens[:, t] where loss_mask[:, t] is 1, predicted from position t-1."""
    return row_nll(model, tokens, loss_mask).sum()


def row_nll(model: nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``target_nll`` of each row, [B]."""
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits.float()
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return (ce * loss_mask[:, 1:]).sum(-1)


@contextmanager
def _router_attr(model: nn.Module, attr: str, values: list[torch.Tensor]):
    found = install(model)
    layers = sorted(found)
    for layer, value in zip(layers, values):
        setattr(found[layer], attr, value)
    try:
        yield
    finally:
        for layer in layers:
            setattr(found[layer], attr, None)


def free_logits_grad(model, tokens, loss_mask, free: list[torch.Tensor]):
    """(NLL, dNLL/dr per MoE layer) with each router's output replaced by ``free`` [B*(L-1), N]."""
    free = [r.detach().requires_grad_(True) for r in free]
    with _router_attr(model, "free", free):
        loss = target_nll(model, tokens, loss_mask)
    return loss.detach(), list(torch.autograd.grad(loss, free))


def first_step(model, tokens, loss_mask):
    """One forward+backward: (NLL, router inputs x, router logits z, dNLL/dr at r = z)."""
    found = install(model)
    layers = sorted(found)
    rows = tokens.shape[0] * (tokens.shape[1] - 1)
    offsets = [
        torch.zeros(rows, found[layer].rmap.n_experts, device=tokens.device, requires_grad=True)
        for layer in layers
    ]
    with _router_attr(model, "offset", offsets), capture_router_inputs(model) as records:
        loss = target_nll(model, tokens, loss_mask)
    grads = torch.autograd.grad(loss, offsets)
    x = {layer: records[layer][0][0] for layer in layers}
    z = {layer: records[layer][0][1] for layer in layers}
    return loss.detach(), x, z, dict(zip(layers, grads))


@contextmanager
def token_scope(model: nn.Module):
    """Detach attention keys and values: each position's gradient comes from its own loss."""
    hooks = []
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        for name in KV_PROJECTIONS:
            proj = getattr(attn, name, None) if attn is not None else None
            if proj is not None:
                hooks.append(proj.register_forward_hook(lambda m, i, out: out.detach()))
    if not hooks:
        raise ValueError("token scope: found no attention key/value projections in this model")
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def auto_surrogate(model: nn.Module) -> int | None:
    """As ``mlx_knnmoe.build.gradient_context.auto_surrogate``: k' = min(N, 4k) where the
    routing map gives
    unselected experts zero gradient (probed on random logits), else None."""
    if model_type(model) == "phimoe":
        return None
    rmap = next(iter(install(model).values())).rmap
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, rmap.n_experts, generator=gen, requires_grad=True)
    inds, weights = rmap.select(z)
    c = torch.randn(weights.shape, generator=gen)
    (grad,) = torch.autograd.grad((weights.float() * c).sum(), z)
    unselected = grad.abs().scatter(-1, inds, 0.0).max().item()
    return surrogate_rule(unselected, grad.abs().max().item(), rmap.n_experts, rmap.top_k)


@contextmanager
def dense_surrogate(model: nn.Module, k: int):
    """Route to ``k`` experts (no group limit) so the gradient can reach unselected experts."""
    spec = spec_for(model)
    found = install(model)
    limits = []
    for layer in moe_blocks(model):
        router = found[layer].inner
        n = found[layer].rmap.n_experts
        if not 1 <= k <= n:
            raise ValueError(f"dense surrogate: k' must be in 1..{n}, got {k}")
        limits.append((router, "top_k", k))
        if getattr(router, "topk_group", None) is not None:
            limits.append((router, "topk_group", router.num_group))
    with overridden(limits):
        blocks = moe_blocks(model)
        with overridden([(found[i], "rmap", routing_map(blocks[i], spec)) for i in found]):
            yield


@contextmanager
def frozen(model: nn.Module):
    """No gradient for the model's weights (only the routing logits get one)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _gradient_context(model, scope, surrogate):
    with gradient_pass(
        scope, surrogate, lambda: token_scope(model), partial(dense_surrogate, model)
    ):
        yield


def _plain_capture(model, tokens):
    with torch.no_grad(), capture_router_inputs(model) as records:
        model(input_ids=tokens[:, :-1], use_cache=False)
    return {layer: rec[0][0] for layer, rec in records.items()}, {
        layer: rec[0][1] for layer, rec in records.items()
    }


def optimise_batch(
    model: nn.Module,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    keep_mask: torch.Tensor,
    etas: list[float],
    steps: int = 1,
    scope: str = "sequence",
    surrogate: int | None = None,
) -> BatchResult:
    """S steps of r <- r - eta * grad_r NLL, for each eta, on one batch [B, L] (right-padded).

    ``keep_mask`` [B, L] marks positions to store; a row's last position has no successor in
    the forward and is never stored.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    loss_mask = loss_mask.float()
    with frozen(model):
        if surrogate:  # keys and r's start are the plain model's; only the gradient differs
            x, z = _plain_capture(model, tokens)
            layers = sorted(z)
            with _gradient_context(model, scope, surrogate):
                loss, grads = free_logits_grad(model, tokens, loss_mask, [z[i] for i in layers])
            grad = dict(zip(layers, grads))
        else:
            with _gradient_context(model, scope, None):
                loss, x, z, grad = first_step(model, tokens, loss_mask)
        layers = sorted(z)
        with _gradient_context(model, scope, surrogate):
            grad_fn = lambda free: free_logits_grad(model, tokens, loss_mask, free)[1]  # noqa: E731
            logits = gradient_steps(z, grad, etas, steps, grad_fn)
    keep = torch.nonzero(keep_mask[:, :-1].reshape(-1) > 0).squeeze(-1).to(tokens.device)
    return BatchResult(
        keys={layer: x[layer][keep] for layer in layers},
        router_logits={layer: z[layer][keep] for layer in layers},
        logits={
            e: {layer: r[keep].detach() for layer, r in rs.items()} for e, rs in logits.items()
        },
        loss_before=float(loss),
        targets=int(loss_mask[:, 1:].sum()),
    )
