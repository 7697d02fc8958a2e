"""Memory construction: teacher-forced forward, then S gradient steps on the routing logits.

For a batch of token sequences with loss masks, every MoE router's output is replaced by
free logits ``r`` (initialised at the router's own logits ``z`` from a plain forward), and
``mx.value_and_grad`` of the summed next-token NLL of the target tokens with respect to all
``r`` gives, in one backward pass, the gradient for every position and every MoE layer
(METHOD.md, step 3). The ``r`` are free variables: changing an early layer's ``r`` changes
later router inputs but not later ``r``, exactly as "r replaces x W_r" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .router import capture_router_inputs, install


@dataclass
class BatchResult:
    keys: dict[int, mx.array]  # router inputs of the kept positions [P, d]
    logits: dict[int, mx.array]  # optimised logits r^(S) [P, N]
    router_logits: dict[int, mx.array]  # the router's own z [P, N]
    loss_before: float
    loss_after: float  # NLL with every position's own r^(S) applied (teacher-forced)
    targets: int


def target_nll(model: nn.Module, tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """Summed NLL of tokens[:, t] where loss_mask[:, t] is 1, predicted from position t-1."""
    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="none")
    return (ce * loss_mask[:, 1:]).sum()


def _set_free(routers, layers, free) -> None:
    for layer, r in zip(layers, free):
        routers[layer]._free = r


def free_logits_nll(model, tokens, loss_mask, free: list[mx.array]) -> mx.array:
    """The target NLL with each MoE layer's router output replaced by ``free`` [B*(L-1), N]."""
    routers = install(model)
    layers = sorted(routers)
    _set_free(routers, layers, free)
    try:
        return target_nll(model, tokens, loss_mask)
    finally:
        _set_free(routers, layers, [None] * len(layers))


def free_logits_grad(model, tokens, loss_mask, free: list[mx.array]):
    """(NLL, dNLL/dr for every MoE layer) in one backward pass."""
    return mx.value_and_grad(lambda r: free_logits_nll(model, tokens, loss_mask, r))(free)


def optimise_batch(
    model: nn.Module,
    tokens: mx.array,
    loss_mask: mx.array,
    keep_mask: mx.array,
    eta: float,
    steps: int = 1,
) -> BatchResult:
    """S steps of r <- r - eta * grad_r NLL for one batch [B, L] of right-padded sequences.

    ``keep_mask`` [B, L] marks positions to store (all non-padding ones by default); the last
    position of a row has no successor in the forward and is never stored.
    """
    inputs = tokens[:, :-1]
    with capture_router_inputs(model) as records:
        mx.eval(model(inputs))
    layers = sorted(records)
    x = {layer: mx.concatenate([r[0] for r in records[layer]]) for layer in layers}
    z = {
        layer: mx.concatenate([r[1] for r in records[layer]]).astype(mx.float32) for layer in layers
    }
    free = [z[layer] for layer in layers]
    loss_before = None
    for _ in range(steps):
        loss, grads = free_logits_grad(model, tokens, loss_mask, free)
        loss_before = float(loss) if loss_before is None else loss_before
        free = [r - eta * g for r, g in zip(free, grads)]
        mx.eval(free)
    loss_after = float(free_logits_nll(model, tokens, loss_mask, free))
    keep = mx.array(keep_mask[:, :-1].reshape(-1).astype(mx.bool_))
    idx = mx.array([i for i, k in enumerate(keep.tolist()) if k], dtype=mx.int32)
    return BatchResult(
        keys={layer: x[layer][idx] for layer in layers},
        logits={layer: r[idx] for layer, r in zip(layers, free)},
        router_logits={layer: z[layer][idx] for layer in layers},
        loss_before=loss_before,
        loss_after=loss_after,
        targets=int(loss_mask[:, 1:].sum()),
    )
