"""The memory file, written once for both frameworks: names, metadata, checks, reading, writing.

One safetensors file. Tensors per memorised MoE layer l: ``layers.{l}.keys`` [M_l, d] (router
inputs) and ``layers.{l}.logits`` [M_l, N] (optimised router logits); optional
``layers.{l}.key_scales`` [M_l] (keys are int8, the key of row i is ``keys[i] * key_scales[i]``),
``layers.{l}.projection`` [D, d] (keys are ``x @ projection.T``; queries are projected the same
way), ``layers.{l}.probe_keys`` [P, d] and ``layers.{l}.probe_logits`` [P, N] (a few router
inputs with the logits of the router the memory was built with); ``layers.{l}.ivf_centroids``
[C, d] and ``layers.{l}.ivf_lists`` [C, L] (an inverted-file index over the keys: C k-means
centroids in the keys' space and, per centroid, the rows of its entries padded with -1 to a
fixed capacity L; readers that do not know them ignore them). String metadata: ``format``,
``version``, and JSON ``fingerprint``, ``bandwidth``, ``build``, ``retrieval``,
``compression``. A file is written with the lowest version that reads it: 1 unless keys are
int8 or projected.

``MemoryData`` holds a memory in either framework's arrays; the MLX ``Memory`` and the PyTorch
companion's ``Memory`` subclass it and supply only array I/O and a few array operations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bandwidth import calibrate_bandwidth

FORMAT = "mlx_knnmoe.memory"
VERSION = 2  # the newest version this package reads and writes
TENSOR_FIELDS = ("keys", "logits", "key_scales", "projection", "probe_keys", "probe_logits")
TENSOR_FIELDS += ("ivf_centroids", "ivf_lists")  # issue 13: inverted-file index
METADATA_FIELDS = ("fingerprint", "bandwidth", "build", "retrieval", "compression")
_TENSOR = re.compile(r"^layers\.(\d+)\.(" + "|".join(TENSOR_FIELDS) + r")$")


class MemoryFormatError(ValueError):
    """The file is not a readable kNN-MoE memory."""


class MemoryMismatchError(ValueError):
    """The memory was built for a different model."""


def parameter_hash(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """The fingerprint's hash of one router: its parameters by name, dtype, shape and bytes
    (bfloat16 given as float32), so both frameworks hash the same weights alike."""
    h = hashlib.sha256()
    for name, arr in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def fingerprint_differences(a: dict, b: dict, name_a: str, name_b: str) -> list[str]:
    """Every fingerprint field on which ``a`` and ``b`` differ, named with both values."""
    return [
        f"{k}: {name_a} has {a.get(k)!r}, {name_b} has {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def atomic_write(path: Path, write: Callable[[Path], None], force: bool, suffix: str) -> Path:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file. Refuses to
    replace an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class MemoryData:
    """A memory's arrays and metadata; see the module docstring for what each holds."""

    keys: dict[int, Any]  # [M, d] in search space: x @ projection.T where a layer is projected
    logits: dict[int, Any]  # [M, N]
    fingerprint: dict
    bandwidth: dict[int, float] = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)
    path: Path | None = None
    projection: dict[int, Any] = field(default_factory=dict)  # [D, d] per projected layer
    probe: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # (x [P, d], z [P, N])
    compression: dict = field(default_factory=dict)  # what compression did; keys "int8" on disk
    # int8 layers: keys stay int8 in RAM, the key of row i is keys[i] * key_scales[i] ([M])
    key_scales: dict[int, Any] = field(default_factory=dict)
    ivf: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # (centroids [C, d], lists)

    # -- the framework's part: array I/O and three array operations ------------------------
    @staticmethod
    def write_file(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        raise NotImplementedError

    @staticmethod
    def read_file(path: Path, device=None) -> tuple[dict[str, Any], dict[str, str]]:
        raise NotImplementedError

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        """float32 NumPy copy of a float array (any integer dtype as is)."""
        raise NotImplementedError

    @staticmethod
    def from_numpy(x: np.ndarray, like=None):
        raise NotImplementedError

    @staticmethod
    def is_float(x) -> bool:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
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
        for layer, scale in self.key_scales.items():
            k = self.keys.get(layer)
            if k is None or self.is_float(k) or tuple(scale.shape) != (k.shape[0],):
                found = None if k is None else (str(k.dtype), tuple(k.shape))
                raise MemoryFormatError(
                    f"layer {layer}: key_scales {tuple(scale.shape)} need int8 keys [M, d] with "
                    f"the same M; keys are {found}"
                )
        for layer, (centroids, lists) in self.ivf.items():
            dim = self.keys[layer].shape[1] if layer in self.keys else None
            if (
                centroids.ndim != 2
                or lists.ndim != 2
                or centroids.shape[0] != lists.shape[0]
                or centroids.shape[1] != dim
                or self.is_float(lists)
            ):
                raise MemoryFormatError(
                    f"layer {layer}: ivf_centroids {tuple(centroids.shape)} and ivf_lists "
                    f"{tuple(lists.shape)} ({lists.dtype}) must be [C, d] and integer [C, L] "
                    f"with d the keys' dimension ({dim})"
                )
        for layer, (x, z) in self.probe.items():
            if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
                raise MemoryFormatError(
                    f"layer {layer}: probe keys {tuple(x.shape)} and logits {tuple(z.shape)} "
                    "must be [P, d] and [P, N] with the same P"
                )
        if not self.bandwidth:
            self.bandwidth = {
                layer: calibrate_bandwidth(self.dense_keys(layer)) for layer in self.keys
            }

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def num_entries(self) -> dict[int, int]:
        return {layer: int(self.keys[layer].shape[0]) for layer in self.layers}

    def input_dim(self, layer: int) -> int:
        """The dimension of the router inputs the layer's keys come from (before projection)."""
        p = self.projection.get(layer)
        return int(p.shape[1]) if p is not None else int(self.keys[layer].shape[1])

    def dense_keys(self, layer: int) -> np.ndarray:
        """One layer's keys as float32 NumPy (int8 keys times their scales)."""
        keys = self.to_numpy(self.keys[layer]).astype(np.float32)
        if layer in self.key_scales:
            return dequantize_rows(keys, self.to_numpy(self.key_scales[layer]))
        return keys

    def nbytes(self, layers: list[int] | None = None) -> int:
        """Bytes of the tensors retrieval reads (keys, scales, logits, projection, index)."""
        total = 0
        for layer in self.layers if layers is None else layers:
            parts = [self.keys[layer], self.logits[layer]]
            parts += [d[layer] for d in (self.key_scales, self.projection) if layer in d]
            parts += list(self.ivf.get(layer, ()))
            total += sum(int(p.nbytes) for p in parts)
        return total

    @property
    def version(self) -> int:
        """The lowest format version that reads this memory correctly."""
        int8 = self.key_scales or self.compression.get("keys") == "int8"
        return 2 if self.projection or int8 else 1

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically; refuse to replace an existing file unless ``force``."""
        path = Path(path)
        if path.name.startswith("model") and path.name.endswith(".safetensors"):
            raise ValueError(
                f"{path}: mlx-lm would load a file named model*.safetensors as weights"
            )
        metadata = {"format": FORMAT, "version": str(self.version)}
        for name in METADATA_FIELDS:
            value = getattr(self, name)
            if name == "bandwidth":
                value = {str(k): float(v) for k, v in value.items()}
            metadata[name] = json.dumps(value, sort_keys=True)
        tensors = self._tensors()
        atomic_write(
            path, lambda tmp: self.write_file(tmp, tensors, metadata), force, ".safetensors"
        )
        self.path = path
        return path

    def _tensors(self) -> dict[str, Any]:
        out = {}
        for layer in self.layers:
            name = f"layers.{layer}"
            keys = self.keys[layer]
            if layer in self.key_scales:
                out[f"{name}.key_scales"] = self.key_scales[layer]
            elif self.compression.get("keys") == "int8":
                q, scale = quantize_rows(self.to_numpy(keys))
                keys = self.from_numpy(q, like=keys)
                out[f"{name}.key_scales"] = self.from_numpy(scale, like=keys)
            out[f"{name}.keys"] = keys
            out[f"{name}.logits"] = self.logits[layer]
            if layer in self.projection:
                out[f"{name}.projection"] = self.projection[layer]
            if layer in self.probe:
                out[f"{name}.probe_keys"], out[f"{name}.probe_logits"] = self.probe[layer]
            if layer in self.ivf:
                out[f"{name}.ivf_centroids"], out[f"{name}.ivf_lists"] = self.ivf[layer]
        return out

    @classmethod
    def load(cls, path: str | Path, layers: list[int] | None = None, device=None):
        """Read a memory file (``layers``: only these layers)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {path} does not exist")
        try:
            arrays, meta = cls.read_file(path, device)
        except Exception as e:  # the readers raise with terse messages of their own
            raise MemoryFormatError(f"{path}: not a readable safetensors file ({e})") from e
        fields = decode_metadata(meta or {}, path)
        tensors: dict[str, dict[int, Any]] = {}
        for name, arr in arrays.items():
            m = _TENSOR.match(name)
            if m is not None:
                tensors.setdefault(m.group(2), {})[int(m.group(1))] = arr
        present = sorted(tensors.get("keys", {}))
        if layers is not None:
            missing = sorted(set(layers) - set(present))
            if missing:
                raise MemoryMismatchError(
                    f"{path}: asked for layers {missing}, the memory has layers {present}"
                )
            tensors = {
                kind: {k: v for k, v in d.items() if k in layers} for kind, d in tensors.items()
            }
        if not tensors.get("keys"):
            raise MemoryFormatError(f"{path}: no 'layers.<l>.keys' tensors in the file")
        try:
            keys = cls._check_keys(tensors, fields["compression"])
            centroids, lists = tensors.get("ivf_centroids", {}), tensors.get("ivf_lists", {})
            if set(centroids) != set(lists):
                raise MemoryFormatError(
                    f"layers with ivf_centroids {sorted(centroids)} differ from layers with "
                    f"ivf_lists {sorted(lists)}"
                )
            probe_keys, probe_logits = (
                tensors.get("probe_keys", {}),
                tensors.get("probe_logits", {}),
            )
            if set(probe_keys) != set(probe_logits):
                raise MemoryFormatError(
                    f"layers with probe_keys {sorted(probe_keys)} differ from layers with "
                    f"probe_logits {sorted(probe_logits)}"
                )
            return cls(
                keys,
                tensors.get("logits", {}),
                fields["fingerprint"],
                {int(k): float(v) for k, v in fields["bandwidth"].items() if int(k) in keys},
                fields["build"],
                fields["retrieval"],
                path,
                tensors.get("projection", {}),
                {layer: (probe_keys[layer], probe_logits[layer]) for layer in probe_keys},
                fields["compression"],
                key_scales=tensors.get("key_scales", {}),
                ivf={layer: (centroids[layer], lists[layer]) for layer in centroids},
            )
        except MemoryFormatError as e:
            raise MemoryFormatError(f"{path}: {e}") from e

    @classmethod
    def _check_keys(cls, tensors: dict, compression: dict) -> dict[int, Any]:
        """The keys as stored: int8 keys stay int8 (with their ``key_scales``)."""
        scales = tensors.get("key_scales", {})
        for layer, k in tensors["keys"].items():
            if layer in scales:
                compression["keys"] = "int8"
            elif not cls.is_float(k):
                raise MemoryFormatError(
                    f"layers.{layer}.keys are {k.dtype} but there is no layers.{layer}.key_scales"
                )
        return tensors["keys"]

    def routers_differing(self, model_fingerprint: dict) -> list[int]:
        """Layers whose router weights differ from those the memory was built with."""
        ours, theirs = self.fingerprint.get("router_hash", {}), model_fingerprint["router_hash"]
        present = [layer for layer in self.layers if str(layer) in theirs]  # pipeline stages
        return [layer for layer in present if ours.get(str(layer)) != theirs[str(layer)]]

    def mismatches(self, theirs: dict, layers: list[int]) -> tuple[list[str], list[str]]:
        """Compared with a model's fingerprint on ``layers``: (structural problems that make
        the memory unusable, notes on differences that still work)."""
        ours = self.fingerprint
        problems = [
            f"{name}: memory has {ours.get(name)!r}, model has {theirs[name]!r}"
            for name in ("model_type", "hidden_size", "num_experts")
            if ours.get(name) != theirs[name]
        ]
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
        notes = []
        if ours.get("top_k") != theirs["top_k"]:
            notes.append(
                f"top_k: memory built with {ours.get('top_k')}, model uses {theirs['top_k']}"
            )
        return problems, notes

    def where(self) -> str:
        return f"memory {self.path}" if self.path else "memory"


def decode_metadata(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The JSON metadata fields of a memory file, after checking its format and version."""
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
    for name in METADATA_FIELDS:
        try:
            fields[name] = json.loads(meta.get(name, "{}"))
        except json.JSONDecodeError as e:
            raise MemoryFormatError(f"{path}: metadata '{name}' is not valid JSON ({e})") from e
    return fields


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row: ``x ~ q * scale[:, None]``."""
    x = x.astype(np.float32)
    scale = np.maximum(np.abs(x).max(axis=1), 1e-30) / 127.0
    q = np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]
