"""The gradient step on the routing logits: teacher-forced forward, then S steps of
``r <- r - eta * dNLL/dr`` for every position and MoE layer of a batch.

The first step adds a zero offset to ``stop_gradient(z)`` inside each router, so one
``mx.value_and_grad`` pass returns the router inputs ``x``, the router logits ``z`` and the
gradient together. Later steps (S > 1) use free logits: changing an early layer's ``r``
changes later router inputs but not later ``r``, exactly as "r replaces x W_r" means. With
S = 1 the gradient does not depend on eta, so ``r = z - eta * g`` for every eta of a grid
comes from one pass.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import SCOPES
from ..data.batches import stored_rows
from ..retrieval.attach import installed
from .gradient_context import gradient_context
from .plan import BatchResult, gradient_steps
from .taps import capture_router_inputs, free_logits, offset_logits


def target_nll(model: nn.Module, tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """Summed NLL of tokens[:, t] where loss_mask[:, t] is 1, predicted from position t-1."""
    return row_nll(model, tokens, loss_mask).sum()


def row_nll(model: nn.Module, tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """``target_nll`` of each row, [B]."""
    tokens, loss_mask = mx.array(tokens), mx.array(loss_mask)
    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="none")
    return (ce * loss_mask[:, 1:]).sum(axis=-1)


def free_logits_nll(model, tokens, loss_mask, free: list[mx.array]) -> mx.array:
    """The target NLL with each MoE layer's router output (layers in increasing order)
    replaced by ``free`` [B*(L-1), N]."""
    with installed(model) as found:
        with free_logits(model, dict(zip(sorted(found), free))):
            return target_nll(model, tokens, loss_mask)


def free_logits_grad(model, tokens, loss_mask, free: list[mx.array]):
    """(NLL, [dNLL/dr per MoE layer]) in one backward pass; see ``free_logits_nll``."""
    return mx.value_and_grad(lambda r: free_logits_nll(model, tokens, loss_mask, r))(free)


def first_step(model, tokens, loss_mask):
    """One forward+backward: (NLL, router inputs x, router logits z, dNLL/dr at r = z)."""
    with installed(model) as found:
        layers = sorted(found)
        rows = tokens.shape[0] * (tokens.shape[1] - 1)
        zeros = [mx.zeros((rows, found[layer].routing.n_experts)) for layer in layers]

        def loss_fn(offsets):
            with offset_logits(model, dict(zip(layers, offsets))) as records:
                loss = target_nll(model, tokens, loss_mask)
            return loss, [records[layer][0] for layer in layers]

        (loss, captured), grads = mx.value_and_grad(loss_fn)(zeros)
    x = {layer: mx.stop_gradient(c[0]) for layer, c in zip(layers, captured)}
    z = {layer: mx.stop_gradient(c[1]).astype(mx.float32) for layer, c in zip(layers, captured)}
    return loss, x, z, dict(zip(layers, grads))


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
    tokens, loss_mask, keep_mask = (mx.array(a) for a in (tokens, loss_mask, keep_mask))
    with installed(model):
        if surrogate:  # keys and r's start are the plain model's; only the gradient pass differs
            x, z = _plain_capture(model, tokens)
            with gradient_context(model, scope, surrogate):
                loss, grads = free_logits_grad(model, tokens, loss_mask, [z[i] for i in sorted(z)])
            grad = dict(zip(sorted(z), grads))
        else:
            with gradient_context(model, scope, None):
                loss, x, z, grad = first_step(model, tokens, loss_mask)
        layers = sorted(z)
        mx.eval(loss, x, z, grad)
        with gradient_context(model, scope, surrogate):
            grad_fn = lambda free: free_logits_grad(model, tokens, loss_mask, free)[1]  # noqa: E731
            logits = gradient_steps(z, grad, etas, steps, grad_fn, mx.eval)
    idx = mx.array(stored_rows(np.array(keep_mask)))
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
