"""A model's fingerprint: what a memory must agree with (architecture, sizes, MoE layers,
a hash of each router's weights)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..arch.specs import get_path, model_type, moe_layers, own_gate, routing_map, spec_for
from .file_format import parameter_hash


def router_hash(gate: nn.Module) -> str:
    params = tree_flatten(own_gate(gate).parameters())
    return parameter_hash(
        (name, np.asarray(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v))
        for name, v in params
    )


def fingerprint(model: nn.Module) -> dict:
    """What a memory must agree with: architecture, sizes, MoE layers, router weights."""
    spec = spec_for(model)
    blocks = moe_layers(model)
    rmap = routing_map(spec, next(iter(blocks.values())))
    return {
        "model_type": model_type(model),
        "hidden_size": int(model.args.hidden_size),
        "num_experts": int(rmap.n_experts),
        "top_k": int(rmap.top_k),
        "moe_layers": sorted(blocks),
        "router_hash": {str(i): router_hash(get_path(b, spec.gate)) for i, b in blocks.items()},
    }
