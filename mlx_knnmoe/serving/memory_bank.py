"""Named memories for the served model, loaded once, and the routing each request asks for.

``MemoryBank`` reads every memory file once, builds each memory's per-layer tables the first
time the model is ready (validated against it), and switches the routers between memories,
or to none, without reloading anything. ``RoutingChoice`` is what one request asks for: a
memory name (None: the plain routers) and the retrieval settings; requests may share a batch
or a cached prompt only when their choices are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import KNNConfig, parse_skip
from ..loading import load_memory, memory_name
from ..memory.store import Memory
from ..memory.validation import validate_for_model
from ..retrieval.attach import attach_layers, layer_memories
from ..retrieval.layer_memory import LayerMemory

NONE = "none"
# request field -> (KNNConfig field, expected type, its name in errors)
REQUEST_FIELDS = {
    "knn_k": ("k", int, "an integer"),
    "mix": ("mix", str, "a string"),
    "lambda_scale": ("lambda_scale", (int, float), "a number"),
    "skip_confident": ("skip", str, "a string such as 'entropy:0.3'"),
}


@dataclass(frozen=True)
class RoutingChoice:
    memory: str | None  # None: the plain routers
    config: KNNConfig | None = None


class MemoryBank:
    def __init__(self, memories: dict[str, Memory], overrides: dict, default: str | None):
        if NONE in memories:
            raise ValueError(f"'{NONE}' is reserved for the plain model; name the memory otherwise")
        if default is not None and default not in memories:
            raise ValueError(f"default memory {default!r} is not one of {self.available(memories)}")
        self.memories = memories
        self.configs = {
            name: KNNConfig.from_memory_defaults(m.retrieval, **overrides)
            for name, m in memories.items()
        }
        self.default = RoutingChoice(default, self.configs.get(default))
        self._model: nn.Module | None = None
        self._layers: dict[str, dict[int, LayerMemory]] = {}

    @classmethod
    def load(
        cls,
        specs: Sequence[str],
        model_path: str,
        overrides: dict | None = None,
        default: str | None = "first",
    ) -> MemoryBank:
        """Read each ``--memory`` (``NAME=spec``, a file, a packaged NAME or ``repo_id:file``).
        ``default``: a name, None for the plain model, or "first" (the first memory if any)."""
        memories: dict[str, Memory] = {}
        for spec in specs:
            name, where = memory_name(spec)
            if name in memories:
                raise ValueError(f"two memories are named {name!r}; use NAME=path to rename one")
            memories[name] = load_memory(where, model_path)
            # read now: MLX streams belong to a thread, and the server computes on another
            mx.eval([v for _, v in tree_flatten(vars(memories[name])) if isinstance(v, mx.array)])
        if default == "first":
            default = next(iter(memories), None)
        return cls(memories, overrides or {}, None if default == NONE else default)

    @staticmethod
    def available(memories) -> str:
        return ", ".join([NONE, *memories])

    def describe(self) -> list[dict]:
        """The memories as ``GET /v1/models`` lists them."""
        return [
            {"name": name, "file": str(m.path), "config": self.configs[name].record()}
            for name, m in self.memories.items()
        ]

    def choice(self, body: dict) -> RoutingChoice:
        """The routing a request's JSON body asks for: its ``memory`` (default: the bank's)
        and retrieval fields. ValueError with a one-line reason for anything unknown."""
        name = body.get("memory", self.default.memory or NONE)
        if name is None or name == NONE:
            given = [f for f in REQUEST_FIELDS if body.get(f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} needs a memory; this request uses none")
            return RoutingChoice(None)
        if not isinstance(name, str) or name not in self.memories:
            raise ValueError(f"unknown memory {name!r}; available: {self.available(self.memories)}")
        changes = {}
        for field, (attr, kind, what) in REQUEST_FIELDS.items():
            value = body.get(field)
            if value is None:
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{field} must be {what}, got {value!r}")
            if field == "skip_confident":
                changes["skip"], changes["skip_threshold"] = parse_skip(value)
            else:
                changes[attr] = value
        return RoutingChoice(name, self.configs[name].updated(**changes))

    def prepare(self, model: nn.Module) -> None:
        """Validate every memory against ``model`` and build its per-layer tables (once per
        model; a model loaded afresh is prepared again)."""
        if model is self._model:
            return
        self._model, self._layers = model, {}
        for name, memory in self.memories.items():
            validate_for_model(memory, model)
            self._layers[name] = layer_memories(model, memory)

    def release(self) -> None:
        """Drop the model and the tables built for it (in the thread that computed them:
        MLX frees arrays on the stream of the thread that made them)."""
        self._model, self._layers = None, {}

    def select(self, model: nn.Module, choice: RoutingChoice) -> None:
        """Route ``model`` as ``choice`` asks (the plain routers for no memory)."""
        self.prepare(model)
        layers = self._layers[choice.memory] if choice.memory is not None else None
        attach_layers(model, layers, choice.config)
