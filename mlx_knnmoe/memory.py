"""The memory: per-layer router-input keys and optimised router logits in one safetensors file.

Tensors ``layers.{l}.keys`` [M_l, d] and ``layers.{l}.logits`` [M_l, N]; string metadata
``format``, ``version``, ``fingerprint``, ``bandwidth``, ``build``, ``retrieval``,
``compression`` (JSON values). The fingerprint describes the model the memory was built for;
``validate`` compares it with a loaded model and names what differs.

Optional tensors (version 2 files; compress.py makes them):
``layers.{l}.key_scales`` [M_l]: keys are int8, the key of row i is ``keys[i] * key_scales[i]``;
``layers.{l}.projection`` [D, d]: keys are ``x @ projection.T`` (D < d) and queries are
projected the same way before search. Optional in any version (probe.py):
``layers.{l}.probe_keys`` [P, d] and ``layers.{l}.probe_logits`` [P, N], a few router inputs with
the logits of the router the memory was built with, to measure how far another router is.
A file is written with the lowest version that reads it: 1 unless keys are int8 or projected.
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

from .arch import get_path, model_type, moe_layers, pipeline_layers, spec_for

FORMAT = "mlx_knnmoe.memory"
VERSION = 2  # the newest version this package reads and writes
_TENSOR = re.compile(
    r"^layers\.(\d+)\.(keys|logits|key_scales|projection|probe_keys|probe_logits)$"
)


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
    keys: dict[int, mx.array]  # in search space: x @ projection.T where a layer is projected
    logits: dict[int, mx.array]
    fingerprint: dict
    bandwidth: dict[int, float] = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)
    path: Path | None = None
    projection: dict[int, mx.array] = field(default_factory=dict)  # [D, d] per projected layer
    probe: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict)  # (x [P, d], z)
    compression: dict = field(default_factory=dict)  # what compress.py did; keys "int8" on disk

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
        for layer, p in self.projection.items():
            if layer not in self.keys or p.ndim != 2 or p.shape[0] != self.keys[layer].shape[1]:
                dim = self.keys[layer].shape[1] if layer in self.keys else None
                raise MemoryFormatError(
                    f"layer {layer}: projection {tuple(p.shape)} must be [D, d] with D the "
                    f"keys' dimension ({dim})"
                )
        for layer, (x, z) in self.probe.items():
            if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
                raise MemoryFormatError(
                    f"layer {layer}: probe keys {tuple(x.shape)} and logits {tuple(z.shape)} "
                    "must be [P, d] and [P, N] with the same P"
                )
        if not self.bandwidth:
            self.bandwidth = {layer: calibrate_bandwidth(self.keys[layer]) for layer in self.keys}

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def num_entries(self) -> dict[int, int]:
        return {layer: int(self.keys[layer].shape[0]) for layer in self.layers}

    def input_dim(self, layer: int) -> int:
        """The dimension of the router inputs the layer's keys come from (before projection)."""
        p = self.projection.get(layer)
        return int(p.shape[1]) if p is not None else int(self.keys[layer].shape[1])

    @property
    def version(self) -> int:
        """The lowest format version that reads this memory correctly."""
        return 2 if self.projection or self.compression.get("keys") == "int8" else 1

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically; refuse to replace an existing file unless ``force``."""
        path = Path(path)
        if path.name.startswith("model") and path.name.endswith(".safetensors"):
            raise ValueError(
                f"{path}: mlx-lm would load a file named model*.safetensors as weights"
            )
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        metadata = {
            "format": FORMAT,
            "version": str(self.version),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "bandwidth": json.dumps({str(k): float(v) for k, v in self.bandwidth.items()}),
            "build": json.dumps(self.build, sort_keys=True),
            "retrieval": json.dumps(self.retrieval, sort_keys=True),
            "compression": json.dumps(self.compression, sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), self._tensors(), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path
        return path

    def _tensors(self) -> dict[str, mx.array]:
        arrays = {}
        for layer in self.layers:
            name = f"layers.{layer}"
            keys = self.keys[layer]
            if self.compression.get("keys") == "int8":
                keys, arrays[f"{name}.key_scales"] = quantize_rows(keys)
            arrays[f"{name}.keys"] = keys
            arrays[f"{name}.logits"] = self.logits[layer]
            if layer in self.projection:
                arrays[f"{name}.projection"] = self.projection[layer]
            if layer in self.probe:
                arrays[f"{name}.probe_keys"], arrays[f"{name}.probe_logits"] = self.probe[layer]
        return arrays

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
        if meta.get("version") not in [str(v) for v in range(1, VERSION + 1)]:
            raise MemoryFormatError(
                f"{path}: metadata 'version' is {meta.get('version')!r}, "
                f"this package reads 1 to {VERSION}"
            )
        fields = {}
        for name in ("fingerprint", "bandwidth", "build", "retrieval", "compression"):
            try:
                fields[name] = json.loads(meta.get(name, "{}"))
            except json.JSONDecodeError as e:
                raise MemoryFormatError(f"{path}: metadata '{name}' is not valid JSON ({e})") from e
        tensors: dict[str, dict[int, mx.array]] = {}
        for name, arr in arrays.items():
            m = _TENSOR.match(name)
            if m is not None:
                tensors.setdefault(m.group(2), {})[int(m.group(1))] = arr
        keys = tensors.get("keys", {})
        if layers is not None:
            missing = sorted(set(layers) - set(keys))
            if missing:
                raise MemoryMismatchError(
                    f"{path}: asked for layers {missing}, the memory has layers {sorted(keys)}"
                )
            tensors = {
                kind: {k: v for k, v in d.items() if k in layers} for kind, d in tensors.items()
            }
            keys = tensors.get("keys", {})
        if not keys:
            raise MemoryFormatError(f"{path}: no 'layers.<l>.keys' tensors in the file")
        try:
            keys = _decode_keys(keys, tensors.get("key_scales", {}), fields["compression"])
            probe = _pairs(tensors.get("probe_keys", {}), tensors.get("probe_logits", {}))
            bandwidth = {int(k): float(v) for k, v in fields["bandwidth"].items() if int(k) in keys}
            return cls(
                keys,
                tensors.get("logits", {}),
                fields["fingerprint"],
                bandwidth,
                fields["build"],
                fields["retrieval"],
                path,
                tensors.get("projection", {}),
                probe,
                fields["compression"],
            )
        except MemoryFormatError as e:
            raise MemoryFormatError(f"{path}: {e}") from e

    def routers_differing(self, model_fingerprint: dict) -> list[int]:
        """Layers whose router weights differ from those the memory was built with."""
        ours, theirs = self.fingerprint.get("router_hash", {}), model_fingerprint["router_hash"]
        present = [layer for layer in self.layers if str(layer) in theirs]  # pipeline stages
        return [layer for layer in present if ours.get(str(layer)) != theirs[str(layer)]]

    def validate(self, model: nn.Module) -> list[str]:
        """Raise MemoryMismatchError naming every structural difference; return warnings.

        On a pipeline stage only the layers this rank runs are checked."""
        stage = pipeline_layers(model)
        layers = [i for i in self.layers if stage is None or i in stage]
        if not moe_layers(model):
            return []  # a pipeline stage without MoE layers: nothing is attached here
        ours, theirs = self.fingerprint, fingerprint(model)
        where = f"memory {self.path}" if self.path else "memory"
        problems = []
        for name in ("model_type", "hidden_size", "num_experts"):
            if ours.get(name) != theirs[name]:
                problems.append(
                    f"{name}: memory has {ours.get(name)!r}, model has {theirs[name]!r}"
                )
        extra = sorted(set(layers) - set(theirs["moe_layers"]))
        if extra:
            problems.append(
                f"layers {extra} are not MoE layers of the model "
                f"(its MoE layers: {theirs['moe_layers']})"
            )
        for layer in layers:
            d, n = self.input_dim(layer), self.logits[layer].shape[1]
            if d != theirs["hidden_size"]:
                what = "projection takes" if layer in self.projection else "keys have"
                problems.append(
                    f"layer {layer}: {what} dim {d}, model hidden_size is {theirs['hidden_size']}"
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
        differ = self.routers_differing(theirs)
        if differ:
            from .probe import agreement_note  # local: probe imports this module

            notes.append(
                f"router weights differ from those the memory was built with in layers "
                f"{differ} (for example a quantised or fine-tuned router); "
                + agreement_note(self, model, differ)
            )
        for note in notes:
            warnings.warn(f"{where}: {note}", stacklevel=2)
        return notes


def _decode_keys(keys: dict, scales: dict, compression: dict) -> dict[int, mx.array]:
    """Dequantise int8 keys (``key_scales``); the memory then saves them as int8 again."""
    out = {}
    for layer, k in keys.items():
        if layer in scales:
            out[layer] = dequantize_rows(k, scales[layer])
            compression["keys"] = "int8"
        elif not mx.issubdtype(k.dtype, mx.floating):
            raise MemoryFormatError(
                f"layers.{layer}.keys are {k.dtype} but there is no layers.{layer}.key_scales"
            )
        else:
            out[layer] = k
    return out


def _pairs(probe_keys: dict, probe_logits: dict) -> dict[int, tuple[mx.array, mx.array]]:
    if set(probe_keys) != set(probe_logits):
        raise MemoryFormatError(
            f"layers with probe_keys {sorted(probe_keys)} differ from layers with probe_logits "
            f"{sorted(probe_logits)}"
        )
    return {layer: (probe_keys[layer], probe_logits[layer]) for layer in probe_keys}


def quantize_rows(x: mx.array) -> tuple[mx.array, mx.array]:
    """Symmetric int8 with one scale per row: ``x ~ q * scale[:, None]``."""
    x = x.astype(mx.float32)
    scale = mx.maximum(mx.abs(x).max(axis=1), 1e-30) / 127.0
    q = mx.clip(mx.round(x / scale[:, None]), -127, 127).astype(mx.int8)
    return q, scale


def dequantize_rows(q: mx.array, scale: mx.array) -> mx.array:
    return q.astype(mx.float32) * scale.astype(mx.float32)[:, None]


def calibrate_bandwidth(keys: mx.array, sample: int = 1024, seed: int = 0) -> float:
    """RBF bandwidth tau: median squared distance from a key to its nearest distinct key.

    Keys closer than 1e-4 of the median squared key norm count as duplicates (the same prefix
    in another example; the expanded distance formula leaves rounding noise of about 1e-6 of
    the norm there), so templated data with many repeated prefixes does not give tau ~ 0.
    """
    k = np.asarray(keys.astype(mx.float32))
    if len(k) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(k), size=min(sample, len(k)), replace=False)
    q = k[rows]
    sq = (k * k).sum(1)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ k.T + sq[None, :]
    d2[np.arange(len(rows)), rows] = np.inf
    d2[d2 <= 1e-4 * np.median(sq)] = np.inf
    nearest = d2.min(1)
    distinct = nearest[np.isfinite(nearest)]
    return float(np.median(distinct)) if len(distinct) else 1.0
