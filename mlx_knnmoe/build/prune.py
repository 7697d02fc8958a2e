"""A smaller memory: only the entries whose optimised logits select other experts than the
model's router does at the same key (the rest would mostly change expert weights)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.specs import get_path, moe_layers, own_gate, router_logits, routing_map, spec_for
from ..memory.store import Memory


def changed_rows(model: nn.Module, layer: int, keys: mx.array, logits: mx.array) -> np.ndarray:
    """Indices of the entries whose top-k expert set under ``logits`` differs from the set
    the model's router picks for ``keys`` (MoE layer ``layer``, its plain gate)."""
    spec = spec_for(model)
    block = moe_layers(model)[layer]
    rmap = routing_map(spec, block)
    gate = own_gate(get_path(block, spec.gate))
    own, _ = rmap.select(router_logits(spec, gate, keys.astype(mx.float32)))
    new, _ = rmap.select(logits.astype(mx.float32))
    same = (mx.sort(own, axis=-1) == mx.sort(new, axis=-1)).all(axis=-1)
    return np.flatnonzero(~np.array(same))


def changed_only(model: nn.Module, memory: Memory) -> Memory | None:
    """``memory`` with the entries of ``changed_rows`` in each layer, same bandwidths; a
    layer left without entries is dropped (None when every layer is)."""
    kept = {}
    for layer in memory.layers:
        rows = changed_rows(model, layer, memory.keys[layer], memory.logits[layer])
        if len(rows):
            kept[layer] = mx.array(rows)
    if not kept:
        return None
    return Memory(
        {layer: memory.keys[layer][rows] for layer, rows in kept.items()},
        {layer: memory.logits[layer][rows] for layer, rows in kept.items()},
        memory.fingerprint,
        {layer: memory.bandwidth[layer] for layer in kept},
    )
