"""Installing router wrappers on a model, attaching a memory to them, changing their settings
and taking them off again: the framework-free steps, shared by MLX (retrieval/attach.py) and
the PyTorch companion (pytorch/router.py). Each framework subclasses ``Wiring`` with how its
wrappers are put on and taken off, how it validates a memory and how it builds one layer's
memory; the public functions of both sides are the bound methods of one instance."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import KNNConfig

ROUTERS = "_knnmoe_routers"  # the model attribute listing installed wrappers by layer


class Wiring:
    """The steps common to every framework; a subclass sets ``memory_type`` (its ``Memory``,
    which loads a path with ``load``) and implements ``wrap``, ``unwrap``, ``validate`` and
    ``layer_memory``."""

    memory_type: type

    def wrap(self, model: Any) -> dict[int, Any]:
        """Put a wrapper on every MoE router of ``model``; the wrappers by layer."""
        raise NotImplementedError

    def unwrap(self, model: Any, found: dict[int, Any]) -> None:
        """Put back the original modules of the wrappers ``found``."""
        raise NotImplementedError

    def validate(self, memory: Any, model: Any) -> None:
        """Refuse a memory built for another model (the framework's ``validate_for_model``)."""
        raise NotImplementedError

    def layer_memory(self, model: Any, memory: Any, layer: int, router: Any) -> Any:
        """Layer ``layer`` of ``memory`` as the wrapper ``router`` reads it."""
        raise NotImplementedError

    def layer_memories(self, model: Any, memory: Any) -> dict[int, Any]:
        """``memory`` as each MoE layer's wrapper reads it (installs the wrappers); layers the
        memory lacks are left out. Build once, then switch with ``attach_layers``."""
        return {
            layer: self.layer_memory(model, memory, layer, router)
            for layer, router in self.install(model).items()
            if layer in memory.keys
        }

    def routers(self, model: Any) -> dict[int, Any]:
        """The installed wrappers by MoE layer index ({} when none are installed)."""
        return getattr(model, ROUTERS, {})

    def install(self, model: Any) -> dict[int, Any]:
        """Wrap every MoE router of ``model`` (idempotent). Without a memory nothing changes."""
        found = self.routers(model)
        if not found:
            found = self.wrap(model)
            object.__setattr__(model, ROUTERS, found)  # a plain attribute, never a parameter
        return found

    def detach(self, model: Any) -> Any:
        """Restore the original gate and experts modules exactly."""
        found = self.routers(model)
        if found:
            self.unwrap(model, found)
            object.__delattr__(model, ROUTERS)
        return model

    def attach(
        self,
        model: Any,
        memory: Any | str | Path,
        config: KNNConfig | None = None,
        validate: bool = True,
    ) -> KNNConfig:
        """Attach ``memory`` (a Memory or a path) to ``model``; returns the config in use.

        Layers the memory lacks keep their plain router. ``config`` defaults to the memory's
        recorded retrieval settings. ``validate``: compare the memory's fingerprint with the
        model (refuse another architecture or shape, warn about other router weights).
        """
        if not isinstance(memory, self.memory_type):
            memory = self.memory_type.load(memory)
        if validate:
            self.validate(memory, model)
        config = config or KNNConfig.from_memory_defaults(memory.retrieval)
        self.attach_layers(model, self.layer_memories(model, memory), config)
        return config

    def attach_layers(
        self, model: Any, layers: dict[int, Any] | None, config: KNNConfig | None
    ) -> None:
        """Point every wrapper at its layer's entry of ``layers`` (from ``layer_memories``)
        with ``config``; None: the plain routers. Switching memories this way rebuilds
        nothing."""
        layers = layers or {}
        for layer, router in self.install(model).items():
            router.memory = layers.get(layer)
            router.config = config or KNNConfig()

    def attached(self, model: Any) -> bool:
        """Whether any layer of ``model`` has a memory attached."""
        return any(r.memory is not None for r in self.routers(model).values())

    def configure(self, model: Any, **changes) -> KNNConfig:
        """Change retrieval settings of an attached model (None values are ignored)."""
        found = self.routers(model)
        if not found:
            raise ValueError("no memory is attached to this model")
        config = next(iter(found.values())).config.updated(**changes)
        for router in found.values():
            router.config = config
        return config

    def current_config(self, model: Any) -> KNNConfig | None:
        """The retrieval settings in use, or None when no wrappers are installed."""
        found = self.routers(model)
        return next(iter(found.values())).config if found else None

    @contextmanager
    def installed(self, model: Any) -> Iterator[dict[int, Any]]:
        """The wrappers, installed for the duration; taken off again if they were not there
        before, so the model leaves exactly as it came (parameter paths included)."""
        fresh = not self.routers(model)
        found = self.install(model)
        try:
            yield found
        finally:
            if fresh:
                self.detach(model)
