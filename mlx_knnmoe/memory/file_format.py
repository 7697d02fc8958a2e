"""The memory file, written once for both frameworks: names, metadata, checks, reading, writing.

One safetensors file. Tensors per memorised MoE layer l: ``layers.{l}.keys`` [M_l, d] (router
inputs) and ``layers.{l}.logits`` [M_l, N] (optimised router logits); optional
``layers.{l}.key_scales`` [M_l] (keys are int8, the key of row i is ``keys[i] * key_scales[i]``),
``layers.{l}.projection`` [D, d] (keys are ``x @ projection.T``; queries are projected the same
way), ``layers.{l}.probe_keys`` [P, d] and ``layers.{l}.probe_logits`` [P, N] (a few router
inputs with the logits of the router the memory was built with); ``layers.{l}.ivf_centroids``
[C, d] and ``layers.{l}.ivf_lists`` [C, L] (an inverted-file index over the keys: C k-means
centroids in the keys' space and, per centroid, the rows of its entries padded with -1 to a
fixed capacity L). Values stored compactly (memory/values.py) replace ``logits`` by
``layers.{l}.top_logits`` [M_l, m], ``layers.{l}.top_experts`` [M_l, m] (uint8 or int16
expert indices) and ``layers.{l}.rest_logits`` [M_l] (the logit of every expert not stored).
String metadata: ``format``,
``version``, and JSON ``fingerprint``, ``bandwidth``, ``build``, ``retrieval``,
``compression``, and ``sha256`` (a digest of each tensor and of the metadata). A file is
written with the lowest version that reads it: 1 unless keys are int8 or projected (2), or
values are top-m (3).

Every load and every save runs one validation (``memory/schema.py``): tensor names and the
per-field rules of ``TENSOR_RULES`` (dtypes, shapes, values), the metadata schema
(``METADATA_CHECKS``) and, on load, the digests. Anything wrong is a ``MemoryFormatError``
naming the file, the tensor or field, what was expected and what was found.

``MemoryData`` holds a memory in either framework's arrays; the MLX ``Memory`` and the PyTorch
companion's ``Memory`` subclass it and supply only array I/O and a few array operations.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_files import atomic_write
from .bandwidth import calibrate_bandwidth
from .schema import (
    FORMAT,
    HASH_FIELD,
    METADATA_FIELDS,
    MISSING,
    MemoryFormatError,
    Said,
    check_format,
    check_metadata,
    check_tensors,
    fail,
    file_kind,
    json_field,
    metadata_digest,
    tensor_digest,
    tensors_by_field,
)
from .values import dense_values


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


@dataclass
class MemoryData:
    """A memory's arrays and metadata; see the module docstring for what each holds."""

    keys: dict[int, Any]  # [M, d] in search space: x @ projection.T where a layer is projected
    logits: dict[int, Any]  # [M, N]; [M, m] for the layers in top_experts
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
    # top-m layers (memory/values.py): logits[l] holds the logits of the experts top_experts[l]
    # [M, m]; every other expert's logit is rest_logits[l] [M]
    top_experts: dict[int, Any] = field(default_factory=dict)
    rest_logits: dict[int, Any] = field(default_factory=dict)

    # -- the framework's part: array I/O and a few array operations -------------------------
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
    def dtype_name(x) -> str:
        """The array's dtype as safetensors names it in lower case: float32, bfloat16, int8..."""
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
        for layer, experts in self.top_experts.items():
            v, rest = self.logits.get(layer), self.rest_logits.get(layer)
            if v is None or rest is None or experts.shape != v.shape or rest.shape != v.shape[:1]:
                raise MemoryFormatError(
                    f"layer {layer}: top_experts {tuple(experts.shape)} need top logits of the "
                    f"same shape and rest logits [M]; found "
                    f"{None if v is None else tuple(v.shape)} and "
                    f"{None if rest is None else tuple(rest.shape)}"
                )
        if set(self.rest_logits) != set(self.top_experts):
            raise MemoryFormatError(
                f"layers with rest logits {sorted(self.rest_logits)} differ from layers with "
                f"top experts {sorted(self.top_experts)}"
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
            if k is None or self.dtype_name(k) != "int8" or tuple(scale.shape) != (k.shape[0],):
                found = None if k is None else (self.dtype_name(k), tuple(k.shape))
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
                or self.dtype_name(lists) != "int32"
            ):
                raise MemoryFormatError(
                    f"layer {layer}: ivf_centroids {tuple(centroids.shape)} and ivf_lists "
                    f"{tuple(lists.shape)} ({self.dtype_name(lists)}) must be [C, d] and int32 "
                    f"[C, L] with d the keys' dimension ({dim})"
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

    def num_experts(self, layer: int) -> int:
        """N, the experts a value row scores (top-m layers store m of them)."""
        if layer in self.top_experts:
            return int(self.fingerprint["num_experts"])
        return int(self.logits[layer].shape[1])

    def dense_logits(self, layer: int, rows: np.ndarray | None = None) -> np.ndarray:
        """One layer's values (``rows`` of them) as dense float32 logits [M, N] in NumPy
        (top-m values rebuilt as memory/values.py says)."""
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        top = pick(self.to_numpy(self.logits[layer]).astype(np.float32))
        if layer not in self.top_experts:
            return top
        experts = pick(self.to_numpy(self.top_experts[layer]))
        rest = pick(self.to_numpy(self.rest_logits[layer]))
        return dense_values(experts, top, rest, self.num_experts(layer))

    def nbytes(self, layers: list[int] | None = None) -> int:
        """Bytes of the tensors retrieval reads (keys, scales, values, projection, index)."""
        total = 0
        for layer in self.layers if layers is None else layers:
            parts = [self.keys[layer], self.logits[layer]]
            tables = (self.key_scales, self.projection, self.top_experts, self.rest_logits)
            parts += [d[layer] for d in tables if layer in d]
            parts += list(self.ivf.get(layer, ()))
            total += sum(int(p.nbytes) for p in parts)
        return total

    @property
    def version(self) -> int:
        """The lowest format version that reads this memory correctly."""
        int8 = self.key_scales or self.compression.get("keys") == "int8"
        return 3 if self.top_experts else 2 if self.projection or int8 else 1

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Check, then write atomically with a content hash of every tensor and of the
        metadata; refuse to replace an existing file unless ``force``."""
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
        where = f"refusing to write {path}"
        by_field = tensors_by_field(where, tensors)
        fields = check_metadata(where, metadata, self.layers)
        check_tensors(where, by_field, self.dtype_name, self.to_numpy, fields["fingerprint"])
        metadata[HASH_FIELD] = json.dumps(
            {"tensors": self._digests(tensors), "metadata": metadata_digest(metadata)},
            sort_keys=True,
        )
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
            if layer in self.top_experts:
                out[f"{name}.top_logits"] = self.logits[layer]
                out[f"{name}.top_experts"] = self.top_experts[layer]
                out[f"{name}.rest_logits"] = self.rest_logits[layer]
            else:
                out[f"{name}.logits"] = self.logits[layer]
            if layer in self.projection:
                out[f"{name}.projection"] = self.projection[layer]
            if layer in self.probe:
                out[f"{name}.probe_keys"], out[f"{name}.probe_logits"] = self.probe[layer]
            if layer in self.ivf:
                out[f"{name}.ivf_centroids"], out[f"{name}.ivf_lists"] = self.ivf[layer]
        return out

    @classmethod
    def _digests(cls, tensors: dict[str, Any]) -> dict[str, str]:
        return {
            name: tensor_digest(cls.dtype_name(x), tuple(x.shape), cls.to_numpy(x))
            for name, x in tensors.items()
        }

    @classmethod
    def load(cls, path: str | Path, layers: list[int] | None = None, device=None):
        """Read a memory file (``layers``: only these layers), checking everything in it:
        metadata, tensor names, dtypes, shapes, values and content hashes; anything wrong
        raises MemoryFormatError naming the file, the field and what was expected."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {path} does not exist")
        if not path.is_file():
            raise MemoryFormatError(f"{path}: expected a memory file, found {file_kind(path)}")
        try:
            arrays, meta = cls.read_file(path, device)
        except Exception as e:  # the readers raise with terse messages of their own
            raise MemoryFormatError(f"{path}: not a readable safetensors file ({e})") from e
        meta = meta or {}
        check_format(path, meta)
        tensors = tensors_by_field(path, arrays)
        present = sorted({layer for d in tensors.values() for layer in d})
        fields = check_metadata(path, meta, present)
        if layers is not None:
            missing = sorted(set(layers) - set(present))
            if missing:
                raise MemoryMismatchError(
                    f"{path}: asked for layers {missing}, the memory has layers {present}"
                )
            tensors = {f: {k: v for k, v in d.items() if k in layers} for f, d in tensors.items()}
            arrays = {name: x for name, x in arrays.items() if int(name.split(".")[1]) in layers}
        check_tensors(path, tensors, cls.dtype_name, cls.to_numpy, fields["fingerprint"])
        cls._check_digests(path, arrays, meta)
        probe_keys, probe_logits = tensors.get("probe_keys", {}), tensors.get("probe_logits", {})
        keys = tensors["keys"]
        scales = tensors.get("key_scales", {})
        cls._check_scaled_keys(path, keys, scales)
        if scales:
            fields["compression"]["keys"] = "int8"
        centroids, lists = tensors.get("ivf_centroids", {}), tensors.get("ivf_lists", {})
        return cls(
            keys,
            {**tensors.get("logits", {}), **tensors.get("top_logits", {})},
            fields["fingerprint"],
            {int(k): float(v) for k, v in fields["bandwidth"].items() if int(k) in keys},
            fields["build"],
            fields["retrieval"],
            path,
            tensors.get("projection", {}),
            {layer: (probe_keys[layer], probe_logits[layer]) for layer in probe_keys},
            fields["compression"],
            key_scales=scales,
            ivf={layer: (centroids[layer], lists[layer]) for layer in centroids},
            top_experts=tensors.get("top_experts", {}),
            rest_logits=tensors.get("rest_logits", {}),
        )

    @classmethod
    def _check_digests(cls, path: Path, arrays: dict[str, Any], meta: dict[str, str]) -> None:
        if HASH_FIELD not in meta:
            warnings.warn(
                f"{path}: no content hashes (written by an older version); loaded unverified",
                stacklevel=3,
            )
            return
        stored = json_field(path, meta, HASH_FIELD)
        digests = stored.get("tensors") if isinstance(stored, dict) else None
        if not isinstance(digests, dict) or not isinstance(stored.get("metadata"), str):
            fail(path, f"metadata '{HASH_FIELD}'", '{"tensors": {...}, "metadata": "..."}', stored)
        if stored["metadata"] != metadata_digest(meta):
            raise MemoryFormatError(
                f"{path}: metadata does not match its sha256 (the file was changed after it "
                "was written)"
            )
        for name, x in arrays.items():
            if name not in digests:
                fail(path, f"tensor '{name}'", f"a digest in '{HASH_FIELD}'", MISSING)
            found = tensor_digest(cls.dtype_name(x), tuple(x.shape), cls.to_numpy(x))
            if found != digests[name]:
                raise MemoryFormatError(
                    f"{path}: tensor '{name}' does not match its sha256 (expected "
                    f"{str(digests[name])[:16]}..., found {found[:16]}...): the file was "
                    "changed after it was written"
                )

    @classmethod
    def _check_scaled_keys(cls, path, keys: dict[int, Any], scales: dict[int, Any]) -> None:
        """int8 keys stay int8 in RAM; their scales must keep every key finite."""
        for layer, scale in scales.items():
            deq = dequantize_rows(cls.to_numpy(keys[layer]), cls.to_numpy(scale))
            if not np.isfinite(deq).all():
                fail(
                    path,
                    f"tensor 'layers.{layer}.key_scales'",
                    "scales that keep keys finite",
                    Said("keys that overflow"),
                )

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
            d, n = self.input_dim(layer), self.num_experts(layer)
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


# -- checks ---------------------------------------------------------------------------------


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row: ``x ~ q * scale[:, None]``."""
    x = x.astype(np.float32)
    scale = np.maximum(np.abs(x).max(axis=1), 1e-30) / 127.0
    q = np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]
