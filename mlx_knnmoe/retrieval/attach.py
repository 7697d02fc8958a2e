"""Installing the router wrappers on a model, attaching a memory, and taking them off again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..arch.specs import get_path, moe_layers, routing_map, set_path, spec_for
from ..config import KNNConfig
from ..memory.store import Memory
from ..memory.validation import validate_for_model
from .layer_memory import LayerMemory
from .router import KNNExperts, KNNRouter
from .routing_stats import RoutingStats
from .wiring import reconfigure

_ROUTERS = "_knnmoe_routers"  # the model attribute listing installed wrappers by layer


def routers(model: nn.Module) -> dict[int, KNNRouter]:
    """The installed wrappers by MoE layer index ({} when none are installed)."""
    return getattr(model, _ROUTERS, {})


def install(model: nn.Module) -> dict[int, KNNRouter]:
    """Wrap every MoE router of ``model`` (idempotent). Without a memory nothing changes."""
    found = routers(model)
    if found:
        return found
    spec = spec_for(model)
    for layer, block in moe_layers(model).items():
        gate = get_path(block, spec.gate)
        router = KNNRouter(gate, routing_map(spec, block), spec.gate_returns, layer)
        set_path(block, spec.gate, router)
        set_path(block, spec.experts, KNNExperts(get_path(block, spec.experts), router))
        found[layer] = router
    object.__setattr__(model, _ROUTERS, found)
    return found


def attach(
    model: nn.Module,
    memory: Memory | str | Path,
    config: KNNConfig | None = None,
    validate: bool = True,
) -> KNNConfig:
    """Attach ``memory`` (a Memory or a path) to ``model``; returns the config in use.

    Layers the memory lacks keep their plain router. ``config`` defaults to the memory's
    recorded retrieval settings. ``validate``: compare the memory's fingerprint with the model
    (refuse another architecture or shape, warn about other router weights).
    """
    if not isinstance(memory, Memory):
        memory = Memory.load(memory)
    if validate:
        validate_for_model(memory, model)
    config = config or KNNConfig.from_memory_defaults(memory.retrieval)
    attach_layers(model, layer_memories(model, memory), config)
    return config


def layer_memories(model: nn.Module, memory: Memory) -> dict[int, LayerMemory]:
    """``memory`` as each MoE layer's wrapper reads it (installs the wrappers); layers the
    memory lacks are left out. Build once, then switch with ``attach_layers``."""
    cache_dir = Path(str(memory.path) + ".hnsw") if memory.path else None
    return {
        layer: LayerMemory.from_memory(memory, layer, router.routing, cache_dir)
        for layer, router in install(model).items()
        if layer in memory.keys
    }


def attach_layers(
    model: nn.Module, layers: dict[int, LayerMemory] | None, config: KNNConfig | None
) -> None:
    """Point every wrapper at its layer's entry of ``layers`` (from ``layer_memories``) with
    ``config``; None: the plain routers. Switching memories this way rebuilds nothing."""
    layers = layers or {}
    for layer, router in install(model).items():
        router.memory = layers.get(layer)
        router.config = config or KNNConfig()


def attached(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has a memory attached."""
    return any(r.memory is not None for r in routers(model).values())


def configure(model: nn.Module, **changes) -> KNNConfig:
    """Change retrieval settings of an attached model (None values are ignored)."""
    return reconfigure(routers(model), **changes)


def current_config(model: nn.Module) -> KNNConfig | None:
    """The retrieval settings in use, or None when no wrappers are installed."""
    found = routers(model)
    return next(iter(found.values())).config if found else None


def detach(model: nn.Module) -> nn.Module:
    """Restore the original gate and experts modules exactly."""
    found = routers(model)
    if not found:
        return model
    spec = spec_for(model)
    for layer, block in moe_layers(model).items():
        set_path(block, spec.gate, found[layer].inner)
        set_path(block, spec.experts, get_path(block, spec.experts).inner)
    object.__delattr__(model, _ROUTERS)
    return model


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


@contextmanager
def installed(model: nn.Module) -> Iterator[dict[int, KNNRouter]]:
    """The wrappers, installed for the duration; taken off again if they were not there
    before, so the model leaves exactly as it came (parameter paths included)."""
    fresh = not routers(model)
    found = install(model)
    try:
        yield found
    finally:
        if fresh:
            detach(model)
