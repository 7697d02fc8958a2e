"""A router probe: how far another model's routers are from those a memory was built with.

The memory stores, per layer, a few of its keys (real router inputs) with the logits that the
router it was built with gave them (``Memory.probe``; saved as ``layers.{l}.probe_keys`` and
``layers.{l}.probe_logits``). Any later model (a quantised conversion, a fine-tune) runs its
own router on the same inputs, and the share of inputs whose top-k expert set is unchanged says
how much of the routing the memory corrects is still the routing it saw. The stored optimised
logits cannot stand in for the original ones: they differ from them by the build's gradient
step, so comparing against them would mix that step with the change of router.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.specs import get_path, moe_layers, own_gate, routing_map, spec_for
from ..arch.specs import router_logits as gate_logits
from .file_format import MemoryMismatchError
from .fingerprint import fingerprint
from .store import Memory

PROBE_SIZE = 64


def router_logits(model: nn.Module, layer: int, x: mx.array) -> mx.array:
    """The model's own router logits z [T, N] for router inputs x [T, d] at a MoE layer."""
    spec = spec_for(model)
    gate = own_gate(get_path(moe_layers(model)[layer], spec.gate))
    x = x.astype(getattr(gate, "scales", gate.weight).dtype)  # the dtype the model runs in
    return gate_logits(spec, gate, x).astype(mx.float32)


def top_sets(model: nn.Module, layer: int, logits: mx.array) -> np.ndarray:
    rmap = routing_map(spec_for(model), moe_layers(model)[layer])
    return np.sort(np.array(rmap.select(logits)[0]), axis=-1)


def record_probe(memory: Memory, model: nn.Module, size: int = PROBE_SIZE) -> None:
    """Store ``size`` evenly spaced keys per layer with ``model``'s router logits for them.

    ``model`` must have the routers the memory was built with, and the keys must be router
    inputs (not projected), so record the probe before a PCA compression.
    """
    differ = memory.routers_differing(fingerprint(model))
    if differ:
        raise MemoryMismatchError(
            f"a router probe must come from the model the memory was built with; this model's "
            f"router weights differ in layers {differ}"
        )
    for layer in memory.layers:
        if layer in memory.projection:
            raise ValueError(
                f"layer {layer}: keys are projected (PCA), the router needs the original "
                "inputs; record the probe before compressing"
            )
        keys = memory.dense_keys(layer)
        rows = np.unique(np.linspace(0, keys.shape[0] - 1, min(size, keys.shape[0])).round())
        x = mx.array(keys[rows.astype(np.int32)])
        z = router_logits(model, layer, x)
        mx.eval(x, z)
        memory.probe[layer] = (x, z)


def agreement(memory: Memory, model: nn.Module) -> dict[int, dict]:
    """Per probed layer: share of probe keys whose top-k expert set the model's router keeps,
    and the relative RMS difference of its logits."""
    out = {}
    for layer, (x, z) in memory.probe.items():
        if layer not in moe_layers(model):
            continue
        logits = router_logits(model, layer, x)
        mine, built = top_sets(model, layer, logits), top_sets(model, layer, z.astype(mx.float32))
        same = (mine == built).all(-1)
        zf = np.array(z.astype(mx.float32))
        err = np.sqrt(((np.array(logits) - zf) ** 2).mean() / max((zf**2).mean(), 1e-30))
        out[layer] = {
            "probe": len(same),
            "top_k": mine.shape[-1],
            "topk_agreement": float(same.mean()),
            "logit_error": float(err),
        }
    return out


def agreement_note(memory: Memory, model: nn.Module, layers: list[int]) -> str:
    """One sentence saying how much the routing of ``layers`` changed, as far as it is known."""
    measured = {i: a for i, a in agreement(memory, model).items() if i in layers}
    if not measured:
        return (
            "the memory stores no router probe, so how much the routing changed is unknown "
            "(`mlx_knnmoe.compress_memory IN OUT --model <the model it was built with>` adds one)"
        )
    share = {i: a["topk_agreement"] for i, a in measured.items()}
    worst = min(share, key=share.get)
    n = max(a["probe"] for a in measured.values())
    err = max(a["logit_error"] for a in measured.values())
    k = max(a["top_k"] for a in measured.values())
    mean = float(np.mean(list(share.values())))
    lowest = f" (lowest {share[worst]:.1%}, layer {worst})" if share[worst] < mean else ""
    return (
        f"on {n} probe keys per layer the router keeps the same top-{k} experts for "
        f"{mean:.1%} of them{lowest}; its logits differ by up to {err:.2%} (relative RMS)"
    )
