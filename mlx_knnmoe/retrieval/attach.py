"""Installing the router wrappers on a model, attaching a memory, and taking them off again."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..arch.specs import get_path, moe_layers, routing_map, set_path, spec_for
from ..memory.store import Memory
from ..memory.validation import validate_for_model
from .layer_memory import LayerMemory
from .router import KNNExperts, KNNRouter
from .routing_stats import RoutingStats
from .wiring import Wiring


class _MlxWiring(Wiring):
    """Wrappers on mlx-lm models: a ``KNNRouter`` in each gate's place, ``KNNExperts`` in
    the experts'; memories validated against the model's fingerprint."""

    memory_type = Memory

    def wrap(self, model: nn.Module) -> dict[int, KNNRouter]:
        spec, found = spec_for(model), {}
        for layer, block in moe_layers(model).items():
            gate = get_path(block, spec.gate)
            router = KNNRouter(gate, routing_map(spec, block), spec.gate_returns, layer)
            set_path(block, spec.gate, router)
            set_path(block, spec.experts, KNNExperts(get_path(block, spec.experts), router))
            found[layer] = router
        return found

    def unwrap(self, model: nn.Module, found: dict[int, KNNRouter]) -> None:
        spec = spec_for(model)
        for layer, block in moe_layers(model).items():
            set_path(block, spec.gate, found[layer].inner)
            set_path(block, spec.experts, get_path(block, spec.experts).inner)

    def validate(self, memory: Memory, model: nn.Module) -> None:
        validate_for_model(memory, model)

    def layer_memory(
        self, model: nn.Module, memory: Memory, layer: int, router: KNNRouter
    ) -> LayerMemory:
        cache_dir = Path(str(memory.path) + ".hnsw") if memory.path else None
        return LayerMemory.from_memory(memory, layer, router.routing, cache_dir)


_WIRING = _MlxWiring()
routers = _WIRING.routers
install = _WIRING.install
attach = _WIRING.attach
layer_memories = _WIRING.layer_memories
attach_layers = _WIRING.attach_layers
attached = _WIRING.attached
configure = _WIRING.configure
current_config = _WIRING.current_config
detach = _WIRING.detach
installed = _WIRING.installed


def set_stats(model: nn.Module, enabled: bool = True) -> None:
    """Start (and reset) or stop collecting per-layer routing statistics."""
    for router in routers(model).values():
        router.stats = RoutingStats() if enabled else None


def count_positions(model: nn.Module, mask: mx.array | None) -> None:
    """Count only the positions where ``mask`` [B, L] is nonzero (not padding) in the
    statistics of the next forwards of a [B, L] batch; None: every position."""
    flat = None if mask is None else mx.array(mask).reshape(-1).astype(mx.float32)
    for router in routers(model).values():
        if router.stats is not None:
            router.stats.positions = flat


def knn_stats(model: nn.Module) -> dict[int, dict]:
    """Per MoE layer: tokens seen, mean lambda, share of tokens whose experts changed."""
    return {
        layer: (r.stats or RoutingStats()).summary()
        for layer, r in routers(model).items()
        if r.memory is not None
    }
