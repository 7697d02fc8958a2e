"""The memory file, written once for both frameworks: names, metadata, checks, reading, writing.

One safetensors file. Tensors per memorised MoE layer l: ``layers.{l}.keys`` [M_l, d] (router
inputs) and ``layers.{l}.logits`` [M_l, N] (optimised router logits); optional
``layers.{l}.key_scales`` [M_l] (keys are int8, the key of row i is ``keys[i] * key_scales[i]``),
``layers.{l}.projection`` [D, d] (keys are ``x @ projection.T``; queries are projected the same
way), ``layers.{l}.probe_keys`` [P, d] and ``layers.{l}.probe_logits`` [P, N] (a few router
inputs with the logits of the router the memory was built with); ``layers.{l}.ivf_centroids``
[C, d] and ``layers.{l}.ivf_lists`` [C, L] (an inverted-file index over the keys: C k-means
centroids in the keys' space and, per centroid, the rows of its entries padded with -1 to a
fixed capacity L). String metadata: ``format``,
``version``, and JSON ``fingerprint``, ``bandwidth``, ``build``, ``retrieval``,
``compression``, and ``sha256`` (a digest of each tensor and of the metadata). A file is
written with the lowest version that reads it: 1 unless keys are int8 or projected.

Every load and every save runs one validation: tensor names and the per-field rules of
``TENSOR_RULES`` (dtypes, shapes, values), the metadata schema (``METADATA_CHECKS``) and,
on load, the digests. Anything wrong is a ``MemoryFormatError`` naming the file, the tensor
or field, what was expected and what was found.

``MemoryData`` holds a memory in either framework's arrays; the MLX ``Memory`` and the PyTorch
companion's ``Memory`` subclass it and supply only array I/O and a few array operations.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig, KNNConfig
from .bandwidth import calibrate_bandwidth

FORMAT = "mlx_knnmoe.memory"
VERSION = 2  # the newest version this package reads and writes
METADATA_FIELDS = ("fingerprint", "bandwidth", "build", "retrieval", "compression")
HASH_FIELD = "sha256"  # JSON {"tensors": {name: digest}, "metadata": digest}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TensorRule:
    """What the tensor ``layers.<l>.<field>`` must be.

    ``shape``: one symbol per axis (``"C+1"``: one more than C). A symbol is a size shared by
    the tensors of one layer; the first tensor in table order that lists it in ``binds`` fixes
    it, every other must agree (``DIM_DEFAULTS``: a symbol no tensor bound takes another's
    size). ``dtypes``: the dtypes allowed; float values must be finite. ``paired``: (dtype,
    field): the tensor has that dtype exactly when that field is present. ``needs``: fields
    that must be present with this one. ``positive``: every value > 0. ``check``: further
    checks of the values (NumPy, the layer's sizes) returning what is wrong, or None.
    """

    shape: tuple[str, ...]
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    binds: tuple[str, ...] = ()
    required: bool = False
    needs: tuple[str, ...] = ()
    paired: tuple[str, str] | None = None
    positive: bool = False
    check: Callable[[np.ndarray, dict[str, int]], str | None] | None = None


def _valid_lists(lists: np.ndarray, dims: dict[str, int]) -> str | None:
    """IVF lists hold entry rows (0..M-1) or -1 (padding)."""
    bad = (lists < -1) | (lists >= dims["M"])
    return (
        f"entry rows in -1..{dims['M'] - 1}, found {int(bad.sum())} outside" if bad.any() else None
    )


# Every per-layer tensor of the file: adding a field is one line here.
# M entries, d key dims, N experts, D router-input dims, P probe rows.
TENSOR_RULES: dict[str, TensorRule] = {
    "keys": TensorRule(
        ("M", "d"), FLOAT_DTYPES + ("int8",), ("M", "d"), True, paired=("int8", "key_scales")
    ),
    "logits": TensorRule(("M", "N"), binds=("N",), required=True),
    "key_scales": TensorRule(("M",), ("float32",), positive=True),
    "projection": TensorRule(("d", "D"), binds=("D",)),
    "probe_keys": TensorRule(("P", "D"), binds=("P",), needs=("probe_logits",)),
    "probe_logits": TensorRule(("P", "N"), needs=("probe_keys",)),
    "ivf_centroids": TensorRule(("C", "d"), binds=("C",), needs=("ivf_lists",)),
    "ivf_lists": TensorRule(
        ("C", "L"), ("int32",), binds=("L",), needs=("ivf_centroids",), check=_valid_lists
    ),
}
DIM_DEFAULTS = {"D": "d"}  # without a projection, the keys are router inputs
FINGERPRINT_DIMS = {"N": "num_experts", "D": "hidden_size"}  # sizes the fingerprint fixes
TENSOR_FIELDS = tuple(TENSOR_RULES)
_TENSOR = re.compile(r"layers\.(0|[1-9][0-9]*)\.([A-Za-z0-9_]+)", re.ASCII)
_LAYER = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp.*", re.ASCII)


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
    replace an existing file unless ``force``. Temporaries a killed writer left are removed."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temporary_path(path: Path, suffix: str = "") -> Path:
    """Where this process writes ``path`` before renaming it (the pid names the writer)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries (``temporary_path``) in ``directory``, of the file ``name`` or of
    any, whose writing process no longer runs: what a killed write left behind."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for tmp in Path(directory).glob(".*.tmp*"):
        m = _TEMPORARY.fullmatch(tmp.name)
        if m and name in (None, m["name"]) and not _running(int(m["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        by_field = _by_field(where, tensors)
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
            raise MemoryFormatError(f"{path}: expected a memory file, found {_file_kind(path)}")
        try:
            arrays, meta = cls.read_file(path, device)
        except Exception as e:  # the readers raise with terse messages of their own
            raise MemoryFormatError(f"{path}: not a readable safetensors file ({e})") from e
        meta = meta or {}
        check_format(path, meta)
        tensors = _by_field(path, arrays)
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
            tensors["logits"],
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
        )

    @classmethod
    def _check_digests(cls, path: Path, arrays: dict[str, Any], meta: dict[str, str]) -> None:
        if HASH_FIELD not in meta:
            warnings.warn(
                f"{path}: no content hashes (written by an older version); loaded unverified",
                stacklevel=3,
            )
            return
        stored = _json_field(path, meta, HASH_FIELD)
        digests = stored.get("tensors") if isinstance(stored, dict) else None
        if not isinstance(digests, dict) or not isinstance(stored.get("metadata"), str):
            _fail(path, f"metadata '{HASH_FIELD}'", '{"tensors": {...}, "metadata": "..."}', stored)
        if stored["metadata"] != metadata_digest(meta):
            raise MemoryFormatError(
                f"{path}: metadata does not match its sha256 (the file was changed after it "
                "was written)"
            )
        for name, x in arrays.items():
            if name not in digests:
                _fail(path, f"tensor '{name}'", f"a digest in '{HASH_FIELD}'", MISSING)
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
                _fail(
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


# -- checks ---------------------------------------------------------------------------------
def _fail(path, what: str, expected: str, found) -> None:
    raise MemoryFormatError(f"{path}: {what}: expected {expected}, found {_show(found)}")


class Said(str):
    """Text that _fail reports as found as it is, unquoted."""

    def __repr__(self) -> str:
        return str(self)


MISSING = Said("none")  # what _fail reports as found for an absent field or tensor


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _by_field(path, arrays: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """Tensors by field and layer; any name but ``layers.<l>.<known field>`` is refused."""
    out: dict[str, dict[int, Any]] = {}
    for name, x in arrays.items():
        m = _TENSOR.fullmatch(name)
        if m is None:
            _fail(path, f"tensor '{name}'", "a name layers.<layer number>.<field>", name)
        if m.group(2) not in TENSOR_RULES:
            _fail(path, f"tensor '{name}'", f"a field among {', '.join(TENSOR_FIELDS)}", name)
        out.setdefault(m.group(2), {})[int(m.group(1))] = x
    return out


def check_tensors(
    path,
    tensors: dict[str, dict[int, Any]],
    dtype_name: Callable[[Any], str],
    to_numpy: Callable[[Any], np.ndarray],
    fingerprint: dict | None = None,
) -> None:
    """Every layer's tensors against ``TENSOR_RULES``: required fields, dtypes, shapes, finite
    (and where asked positive) values; sizes the fingerprint names (``FINGERPRINT_DIMS``)
    agree with it."""
    layers = sorted({layer for d in tensors.values() for layer in d})
    if not layers:
        raise MemoryFormatError(f"{path}: no tensors; a memory has layers.<l>.keys and .logits")
    for layer in layers:
        here = {f: d[layer] for f, d in tensors.items() if layer in d}
        dims: dict[str, tuple[int, str]] = {}  # symbol -> (size, the tensor that fixed it)
        for name, rule in TENSOR_RULES.items():
            tensor = f"layers.{layer}.{name}"
            if name not in here:
                if rule.required:
                    _fail(path, f"layer {layer}", f"a tensor '{tensor}'", MISSING)
                continue
            for other in rule.needs:
                if other not in here:
                    _fail(path, f"tensor '{tensor}'", f"'layers.{layer}.{other}' with it", MISSING)
            x = here[name]
            _check_dtype(path, tensor, layer, rule, dtype_name(x), here)
            _check_shape(path, tensor, rule, tuple(int(n) for n in x.shape), dims)
            _check_values(path, tensor, rule, to_numpy(x), dtype_name(x), dims)
        for symbol, name in FINGERPRINT_DIMS.items():
            size = _size(symbol, dims)
            if fingerprint is not None and size is not None and size[0] != fingerprint[name]:
                _fail(
                    path,
                    f"tensor '{size[1]}'",
                    f"{symbol} = fingerprint.{name} = {fingerprint[name]}",
                    Said(f"{symbol} = {size[0]}"),
                )


def _check_dtype(path, tensor: str, layer: int, rule: TensorRule, dtype: str, here) -> None:
    if dtype not in rule.dtypes:
        _fail(path, f"tensor '{tensor}'", "dtype " + " or ".join(rule.dtypes), dtype)
    if rule.paired is not None:
        paired_dtype, other = rule.paired
        if (dtype == paired_dtype) != (other in here):
            expected = (
                f"{paired_dtype} with 'layers.{layer}.{other}'"
                if other in here
                else f"a dtype other than {paired_dtype} without 'layers.{layer}.{other}'"
            )
            _fail(path, f"tensor '{tensor}'", expected, dtype)


def _check_shape(path, tensor: str, rule: TensorRule, shape: tuple, dims: dict) -> None:
    def known(symbol: str) -> tuple[int, str] | None:
        return dims.get(symbol) if symbol in rule.binds else _size(symbol, dims)

    def expected() -> str:
        sizes = [f"{s}={known(s)[0]} (from {known(s)[1]})" for s in rule.shape if known(s)]
        return f"shape [{', '.join(rule.shape)}]" + (f" with {', '.join(sizes)}" if sizes else "")

    if len(shape) != len(rule.shape):
        _fail(path, f"tensor '{tensor}'", expected(), shape)
    for symbol, n in zip(rule.shape, shape):
        size = known(symbol)
        if size is None and symbol in rule.binds:
            if n < 1:
                _fail(path, f"tensor '{tensor}'", f"at least 1 along {symbol}", shape)
            dims[symbol] = (n, tensor)
        elif size is None or size[0] != n:
            _fail(path, f"tensor '{tensor}'", expected(), shape)


def _size(symbol: str, dims: dict) -> tuple[int, str] | None:
    """The size a shape symbol stands for (``"C+1"``: C's plus one), or None if not fixed."""
    base, _, plus = symbol.partition("+")
    known = dims.get(base) or dims.get(DIM_DEFAULTS.get(base, ""))
    return None if known is None else (known[0] + int(plus or 0), known[1])


def _check_values(path, tensor, rule: TensorRule, x: np.ndarray, dtype: str, dims) -> None:
    if dtype in FLOAT_DTYPES and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        _fail(path, f"tensor '{tensor}'", "finite values", Said(f"{bad} NaN or infinite values"))
    if rule.positive and not (x > 0).all():
        _fail(path, f"tensor '{tensor}'", "values > 0", f"minimum {x.min()!r}")
    problem = rule.check(x, {s: n for s, (n, _) in dims.items()}) if rule.check else None
    if problem:
        _fail(path, f"tensor '{tensor}'", "valid values", problem)


def tensor_digest(dtype: str, shape: tuple, values: np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and values (bfloat16 hashed as its float32 values,
    so MLX and torch agree)."""
    h = hashlib.sha256(f"{dtype}:{list(shape)};".encode())
    h.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    return h.hexdigest()


def metadata_digest(meta: dict[str, str]) -> str:
    """sha256 of the metadata strings (every field but the hash itself)."""
    fields = ("format", "version", *METADATA_FIELDS)
    return hashlib.sha256(json.dumps([meta.get(f) for f in fields]).encode()).hexdigest()


def _json_field(path, meta: dict[str, str], name: str):
    text = meta[name]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MemoryFormatError(f"{path}: metadata '{name}' is not valid JSON ({e})") from e
    except RecursionError:
        raise MemoryFormatError(f"{path}: metadata '{name}' is nested too deeply") from None


def check_format(path, meta: dict[str, str]) -> None:
    """The file says it is a memory, in a version this package reads."""
    if meta.get("format") != FORMAT:
        raise MemoryFormatError(
            f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    if meta.get("version") not in [str(v) for v in range(1, VERSION + 1)]:
        raise MemoryFormatError(
            f"{path}: metadata 'version' is {meta.get('version')!r}, "
            f"this package reads 1 to {VERSION}"
        )


def decode_metadata(meta: dict[str, str], path) -> dict[str, Any]:
    """The JSON metadata fields of a memory file, after checking its format and version."""
    check_format(path, meta)
    fields = {}
    for name in METADATA_FIELDS:
        if name in REQUIRED_METADATA and name not in meta:
            _fail(path, f"metadata '{name}'", "a JSON object", MISSING)
        fields[name] = _json_field(path, meta, name) if name in meta else {}
        if not isinstance(fields[name], dict):
            _fail(path, f"metadata '{name}'", "a JSON object", fields[name])
    return fields


def check_metadata(path, meta: dict[str, str], layers: list[int]) -> dict[str, Any]:
    """The decoded metadata fields, each checked against its schema and ``layers`` (the
    memorised layers: each must be in the fingerprint, the bandwidths and the router hashes)."""
    fields = decode_metadata(meta, path)
    for name, check in METADATA_CHECKS.items():
        check(path, fields[name])
    fp = fields["fingerprint"]
    for layer in layers:
        if layer not in fp["moe_layers"]:
            _fail(
                path,
                f"tensors of layer {layer}",
                "a layer in fingerprint.moe_layers",
                fp["moe_layers"],
            )
        for table, where in (
            (fields["bandwidth"], "bandwidth"),
            (fp["router_hash"], "fingerprint.router_hash"),
        ):
            if str(layer) not in table:
                _fail(path, f"metadata '{where}'", f"an entry for memorised layer {layer}", MISSING)
    extra = sorted(set(fields["bandwidth"]) - {str(layer) for layer in layers}, key=int)
    if extra:
        _fail(
            path,
            "metadata 'bandwidth'",
            f"entries for the memorised layers {layers} only",
            Said(f"entries for layers {[int(k) for k in extra]}"),
        )
    return fields


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _is_number(v) and v > 0


def _layer_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v)


def _hash_table(v) -> bool:
    return isinstance(v, dict) and all(
        _LAYER.fullmatch(k) and isinstance(h, str) for k, h in v.items()
    )


# fingerprint field -> (test, what it must be)
FINGERPRINT_SCHEMA = {
    "model_type": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "hidden_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_experts": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "top_k": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "moe_layers": (_layer_list, "a list of distinct layer numbers"),
    "router_hash": (_hash_table, "an object of layer number -> hash string"),
}
REQUIRED_METADATA = ("fingerprint", "bandwidth", "build", "retrieval")  # not compression
KEY_DTYPES = FLOAT_DTYPES + ("int8",)


def _check_fingerprint(path, fp: dict) -> None:
    for name, (test, expected) in FINGERPRINT_SCHEMA.items():
        if name not in fp or not test(fp[name]):
            _fail(path, f"metadata 'fingerprint.{name}'", expected, fp.get(name, MISSING))
    if fp["top_k"] > fp["num_experts"]:
        _fail(
            path,
            "metadata 'fingerprint.top_k'",
            f"at most num_experts ({fp['num_experts']})",
            fp["top_k"],
        )


def _check_bandwidth(path, bandwidth: dict) -> None:
    for layer, tau in bandwidth.items():
        if not _LAYER.fullmatch(layer):
            _fail(path, "metadata 'bandwidth'", "layer numbers as keys", layer)
        if not _positive(tau):
            _fail(path, f"metadata 'bandwidth.{layer}'", "a finite number > 0", tau)


def _check_retrieval(path, retrieval: dict) -> None:
    try:
        KNNConfig.from_memory_defaults(retrieval)
    except (TypeError, ValueError) as e:
        raise MemoryFormatError(f"{path}: metadata 'retrieval': {e}") from None


def _check_build(path, build: dict, where: str = "build") -> None:
    if "config" in build:
        if not isinstance(build["config"], dict):
            _fail(path, f"metadata '{where}.config'", "a JSON object", build["config"])
        try:
            BuildConfig.from_record(build["config"])
        except (TypeError, ValueError) as e:
            raise MemoryFormatError(f"{path}: metadata '{where}.config': {e}") from None
    if build.get("eta") is not None and not _positive(build["eta"]):
        _fail(path, f"metadata '{where}.eta'", "a finite number > 0 or null", build["eta"])
    if "parts" in build:
        parts = build["parts"]
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            _fail(path, f"metadata '{where}.parts'", "a list of objects", parts)
        for i, part in enumerate(parts):
            _check_build(path, part, f"{where}.parts[{i}]")


def _check_compression(path, compression: dict) -> None:
    if compression.get("keys", "float32") not in KEY_DTYPES:
        _fail(path, "metadata 'compression.keys'", " or ".join(KEY_DTYPES), compression["keys"])


METADATA_CHECKS = {
    "fingerprint": _check_fingerprint,
    "bandwidth": _check_bandwidth,
    "build": _check_build,
    "retrieval": _check_retrieval,
    "compression": _check_compression,
}


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row: ``x ~ q * scale[:, None]``."""
    x = x.astype(np.float32)
    scale = np.maximum(np.abs(x).max(axis=1), 1e-30) / 127.0
    q = np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]
