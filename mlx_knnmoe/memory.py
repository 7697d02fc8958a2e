"""The memory: per-layer router-input keys and optimised router logits in one safetensors file.

Tensors ``layers.{l}.keys`` [M_l, d] and ``layers.{l}.logits`` [M_l, N]; string metadata
``format``, ``version``, ``fingerprint``, ``bandwidth``, ``build``, ``retrieval`` (JSON
values). The fingerprint describes the model the memory was built for; ``validate`` compares
it with a loaded model and names what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .arch import get_path, model_type, moe_layers, spec_for

FORMAT = "mlx_knnmoe.memory"
VERSION = 1
_TENSOR = re.compile(r"^layers\.(\d+)\.(keys|logits)$")


class MemoryFormatError(ValueError):
    """The file is not a readable kNN-MoE memory."""


class MemoryMismatchError(ValueError):
    """The memory was built for a different model."""


def router_hash(gate: nn.Module) -> str:
    gate = getattr(gate, "inner", gate)  # look through our own wrapper
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(gate.parameters()), key=lambda kv: kv[0]):
        if value.dtype == mx.bfloat16:
            value = value.astype(mx.float32)
        arr = np.asarray(value)
        h.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict:
    """What a memory must agree with: architecture, sizes, MoE layers, router weights."""
    spec = spec_for(model)
    from .router import routing_map  # local: router imports this module

    blocks = moe_layers(model)
    first = next(iter(blocks.values()))
    rmap = routing_map(spec, first)
    return {
        "model_type": model_type(model),
        "hidden_size": int(model.args.hidden_size),
        "num_experts": int(rmap.n_experts),
        "top_k": int(rmap.top_k),
        "moe_layers": sorted(blocks),
        "router_hash": {str(i): router_hash(get_path(b, spec.gate)) for i, b in blocks.items()},
    }


@dataclass
class Memory:
    keys: dict[int, mx.array]
    logits: dict[int, mx.array]
    fingerprint: dict
    bandwidth: dict[int, float] = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        if set(self.keys) != set(self.logits):
            raise MemoryFormatError(
                f"layers with keys {sorted(self.keys)} differ from layers with logits "
                f"{sorted(self.logits)}"
            )
        for layer in self.keys:
            k, v = self.keys[layer], self.logits[layer]
            if k.ndim != 2 or v.ndim != 2 or k.shape[0] != v.shape[0]:
                raise MemoryFormatError(
                    f"layer {layer}: keys {tuple(k.shape)} and logits {tuple(v.shape)} must be "
                    "[M, d] and [M, N] with the same M"
                )
        if not self.bandwidth:
            self.bandwidth = {layer: calibrate_bandwidth(self.keys[layer]) for layer in self.keys}

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def num_entries(self) -> dict[int, int]:
        return {layer: int(self.keys[layer].shape[0]) for layer in self.layers}

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically; refuse to replace an existing file unless ``force``."""
        path = Path(path)
        if path.name.startswith("model") and path.name.endswith(".safetensors"):
            raise ValueError(
                f"{path}: mlx-lm would load a file named model*.safetensors as weights"
            )
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        arrays = {}
        for layer in self.layers:
            arrays[f"layers.{layer}.keys"] = self.keys[layer]
            arrays[f"layers.{layer}.logits"] = self.logits[layer]
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "bandwidth": json.dumps({str(k): float(v) for k, v in self.bandwidth.items()}),
            "build": json.dumps(self.build, sort_keys=True),
            "retrieval": json.dumps(self.retrieval, sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, layers: list[int] | None = None) -> "Memory":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {path} does not exist")
        try:
            arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError with terse messages
            raise MemoryFormatError(f"{path}: not a readable safetensors file ({e})") from e
        if meta.get("format") != FORMAT:
            raise MemoryFormatError(
                f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
            )
        if meta.get("version") != str(VERSION):
            raise MemoryFormatError(
                f"{path}: metadata 'version' is {meta.get('version')!r}, "
                f"this package reads {VERSION}"
            )
        fields = {}
        for name in ("fingerprint", "bandwidth", "build", "retrieval"):
            try:
                fields[name] = json.loads(meta.get(name, "{}"))
            except json.JSONDecodeError as e:
                raise MemoryFormatError(f"{path}: metadata '{name}' is not valid JSON ({e})") from e
        keys, logits = {}, {}
        for name, arr in arrays.items():
            m = _TENSOR.match(name)
            if m is None:
                continue
            (keys if m.group(2) == "keys" else logits)[int(m.group(1))] = arr
        if layers is not None:
            missing = sorted(set(layers) - set(keys))
            if missing:
                raise MemoryMismatchError(
                    f"{path}: asked for layers {missing}, the memory has layers {sorted(keys)}"
                )
            keys = {k: v for k, v in keys.items() if k in layers}
            logits = {k: v for k, v in logits.items() if k in layers}
        if not keys:
            raise MemoryFormatError(f"{path}: no 'layers.<l>.keys' tensors in the file")
        bandwidth = {int(k): float(v) for k, v in fields["bandwidth"].items() if int(k) in keys}
        try:
            return cls(
                keys,
                logits,
                fields["fingerprint"],
                bandwidth,
                fields["build"],
                fields["retrieval"],
                path,
            )
        except MemoryFormatError as e:
            raise MemoryFormatError(f"{path}: {e}") from e

    def validate(self, model: nn.Module) -> list[str]:
        """Raise MemoryMismatchError naming every structural difference; return warnings."""
        ours, theirs = self.fingerprint, fingerprint(model)
        where = f"memory {self.path}" if self.path else "memory"
        problems = []
        for name in ("model_type", "hidden_size", "num_experts"):
            if ours.get(name) != theirs[name]:
                problems.append(
                    f"{name}: memory has {ours.get(name)!r}, model has {theirs[name]!r}"
                )
        extra = sorted(set(self.layers) - set(theirs["moe_layers"]))
        if extra:
            problems.append(
                f"layers {extra} are not MoE layers of the model "
                f"(its MoE layers: {theirs['moe_layers']})"
            )
        for layer in self.layers:
            d, n = self.keys[layer].shape[1], self.logits[layer].shape[1]
            if d != theirs["hidden_size"]:
                problems.append(
                    f"layer {layer}: keys have dim {d}, model hidden_size is "
                    f"{theirs['hidden_size']}"
                )
            if n != theirs["num_experts"]:
                problems.append(
                    f"layer {layer}: logits have {n} experts, model has {theirs['num_experts']}"
                )
        if problems:
            raise MemoryMismatchError(
                f"{where} does not fit this model:\n  " + "\n  ".join(problems)
            )
        notes = []
        if ours.get("top_k") != theirs["top_k"]:
            notes.append(
                f"top_k: memory built with {ours.get('top_k')}, model uses {theirs['top_k']}"
            )
        differ = [
            layer
            for layer in self.layers
            if ours.get("router_hash", {}).get(str(layer)) != theirs["router_hash"].get(str(layer))
        ]
        if differ:
            notes.append(
                f"router weights differ from those the memory was built with in layers "
                f"{differ} (for example a quantised or fine-tuned router)"
            )
        for note in notes:
            warnings.warn(f"{where}: {note}", stacklevel=2)
        return notes


def calibrate_bandwidth(keys: mx.array, sample: int = 1024, seed: int = 0) -> float:
    """RBF bandwidth tau: median squared distance from a key to its nearest other key."""
    k = np.asarray(keys.astype(mx.float32))
    if len(k) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(k), size=min(sample, len(k)), replace=False)
    q = k[rows]
    sq = (k * k).sum(1)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ k.T + sq[None, :]
    d2[np.arange(len(rows)), rows] = np.inf
    nearest = np.maximum(d2.min(1), 0.0)
    positive = nearest[nearest > 0]
    return float(np.median(positive)) if len(positive) else 1.0
