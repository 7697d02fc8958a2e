"""Putting a memory on installed router wrappers and changing their settings: the
framework-free part of attach and configure, shared by MLX (retrieval/attach.py) and the
PyTorch companion (pytorch/router.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import KNNConfig


def assign_memory(
    routers: dict[int, Any],
    memory: Any,
    config: KNNConfig | None,
    layer_memory: Callable[[int, Any], Any],
) -> KNNConfig:
    """Give every wrapper whose layer the memory holds ``layer_memory(layer, wrapper)``; the
    others keep their plain router. ``config`` defaults to the memory's recorded settings."""
    config = config or KNNConfig.from_memory_defaults(memory.retrieval)
    for layer, router in routers.items():
        router.memory = layer_memory(layer, router) if layer in memory.keys else None
        router.config = config
    return config


def reconfigure(routers: dict[int, Any], **changes) -> KNNConfig:
    """Change the retrieval settings of attached wrappers (None values are ignored)."""
    if not routers:
        raise ValueError("no memory is attached to this model")
    config = next(iter(routers.values())).config.updated(**changes)
    for router in routers.values():
        router.config = config
    return config
