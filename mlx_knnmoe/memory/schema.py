"""The schema of a memory file, checked on every load and save: tensor names, the per-field
rules of ``TENSOR_RULES`` (dtypes, shapes, values), the metadata (``METADATA_CHECKS``) and the
content digests. Anything wrong is a ``MemoryFormatError`` naming the file, the tensor or field,
what was expected and what was found. Framework-free (NumPy)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig, KNNConfig

FORMAT = "mlx_knnmoe.memory"
VERSION = 3  # the newest version this package reads and writes
METADATA_FIELDS = ("fingerprint", "bandwidth", "build", "retrieval", "compression")
HASH_FIELD = "sha256"  # JSON {"tensors": {name: digest}, "metadata": digest}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
EXPERT_DTYPES = ("uint8", "int16")


@dataclass(frozen=True)
class TensorRule:
    """What the tensor ``layers.<l>.<field>`` must be.

    ``shape``: one symbol per axis (``"C+1"``: one more than C). A symbol is a size shared by
    the tensors of one layer; the first tensor in table order that lists it in ``binds`` fixes
    it, every other must agree (``DIM_DEFAULTS``: a symbol no tensor bound takes another's
    size). ``dtypes``: the dtypes allowed; float values must be finite. ``paired``: (dtype,
    field): the tensor has that dtype exactly when that field is present. ``needs``: fields
    that must be present with this one. ``positive``: every value > 0. ``check``: further
    checks of the values (NumPy, the layer's sizes; a size no tensor fixed comes from the
    fingerprint where it names one) returning what is wrong, or None. ``instead_of``: a
    required field this one stands in for (one of the two, never both).
    """

    shape: tuple[str, ...]
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    binds: tuple[str, ...] = ()
    required: bool = False
    needs: tuple[str, ...] = ()
    paired: tuple[str, str] | None = None
    positive: bool = False
    check: Callable[[np.ndarray, dict[str, int]], str | None] | None = None
    instead_of: str | None = None


def _valid_experts(experts: np.ndarray, dims: dict[str, int]) -> str | None:
    """Top-m expert indices: each in 0..N-1, distinct within a row."""
    n = dims.get("N")
    if n is not None and ((experts < 0) | (experts >= n)).any():
        bad = int(((experts < 0) | (experts >= n)).sum())
        return f"expert indices in 0..{n - 1}, found {bad} outside"
    ordered = np.sort(experts.astype(np.int64), axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        return "distinct experts in every row, found a row naming one twice"
    return None


def _valid_lists(lists: np.ndarray, dims: dict[str, int]) -> str | None:
    """IVF lists hold entry rows (0..M-1) or -1 (padding)."""
    bad = (lists < -1) | (lists >= dims["M"])
    return (
        f"entry rows in -1..{dims['M'] - 1}, found {int(bad.sum())} outside" if bad.any() else None
    )


# Every per-layer tensor of the file: adding a field is one line here.
# M entries, d key dims, N experts, D router-input dims, P probe rows, m stored experts.
TENSOR_RULES: dict[str, TensorRule] = {
    "keys": TensorRule(
        ("M", "d"), FLOAT_DTYPES + ("int8",), ("M", "d"), True, paired=("int8", "key_scales")
    ),
    "logits": TensorRule(("M", "N"), binds=("N",), required=True),
    "key_scales": TensorRule(("M",), ("float32",), positive=True),
    "projection": TensorRule(("d", "D"), binds=("D",)),
    "probe_keys": TensorRule(("P", "D"), binds=("P",), needs=("probe_logits",)),
    "probe_logits": TensorRule(("P", "N"), binds=("N",), needs=("probe_keys",)),
    "ivf_centroids": TensorRule(("C", "d"), binds=("C",), needs=("ivf_lists",)),
    "ivf_lists": TensorRule(
        ("C", "L"), ("int32",), binds=("L",), needs=("ivf_centroids",), check=_valid_lists
    ),
    # top-m values (memory/values.py): the stored experts' logits, their indices, one rest logit
    "top_logits": TensorRule(
        ("M", "m"), binds=("m",), needs=("top_experts", "rest_logits"), instead_of="logits"
    ),
    "top_experts": TensorRule(
        ("M", "m"), EXPERT_DTYPES, needs=("top_logits",), check=_valid_experts
    ),
    "rest_logits": TensorRule(("M",), needs=("top_logits",)),
}
DIM_DEFAULTS = {"D": "d"}  # without a projection, the keys are router inputs
FINGERPRINT_DIMS = {"N": "num_experts", "D": "hidden_size"}  # sizes the fingerprint fixes
TENSOR_FIELDS = tuple(TENSOR_RULES)
_TENSOR = re.compile(r"layers\.(0|[1-9][0-9]*)\.([A-Za-z0-9_]+)", re.ASCII)
_LAYER = re.compile(r"0|[1-9][0-9]*", re.ASCII)


class MemoryFormatError(ValueError):
    """The file is not a readable kNN-MoE memory."""


def fail(path, what: str, expected: str, found) -> None:
    raise MemoryFormatError(f"{path}: {what}: expected {expected}, found {_show(found)}")


class Said(str):
    """Text that fail reports as found as it is, unquoted."""

    def __repr__(self) -> str:
        return str(self)


MISSING = Said("none")  # what fail reports as found for an absent field or tensor


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def tensors_by_field(path, arrays: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """Tensors by field and layer; any name but ``layers.<l>.<known field>`` is refused."""
    out: dict[str, dict[int, Any]] = {}
    for name, x in arrays.items():
        m = _TENSOR.fullmatch(name)
        if m is None:
            fail(path, f"tensor '{name}'", "a name layers.<layer number>.<field>", name)
        if m.group(2) not in TENSOR_RULES:
            fail(path, f"tensor '{name}'", f"a field among {', '.join(TENSOR_FIELDS)}", name)
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
    fixed = {  # the fingerprint's sizes, for value checks where no tensor fixed them
        symbol: fingerprint[name]
        for symbol, name in FINGERPRINT_DIMS.items()
        if fingerprint is not None and name in fingerprint
    }
    stand_ins = {rule.instead_of: name for name, rule in TENSOR_RULES.items() if rule.instead_of}
    for layer in layers:
        here = {f: d[layer] for f, d in tensors.items() if layer in d}
        dims: dict[str, tuple[int, str]] = {}  # symbol -> (size, the tensor that fixed it)
        for name, rule in TENSOR_RULES.items():
            tensor = f"layers.{layer}.{name}"
            if rule.instead_of in here and name in here:
                fail(
                    path,
                    f"tensor '{tensor}'",
                    f"either it or 'layers.{layer}.{rule.instead_of}', not both",
                    Said("both"),
                )
            if name not in here:
                if rule.required and stand_ins.get(name) not in here:
                    fail(path, f"layer {layer}", f"a tensor '{tensor}'", MISSING)
                continue
            for other in rule.needs:
                if other not in here:
                    fail(path, f"tensor '{tensor}'", f"'layers.{layer}.{other}' with it", MISSING)
            x = here[name]
            _check_dtype(path, tensor, layer, rule, dtype_name(x), here)
            _check_shape(path, tensor, rule, tuple(int(n) for n in x.shape), dims)
            _check_values(path, tensor, rule, to_numpy(x), dtype_name(x), dims, fixed)
        for symbol, name in FINGERPRINT_DIMS.items():
            size = _size(symbol, dims)
            if fingerprint is not None and size is not None and size[0] != fingerprint[name]:
                fail(
                    path,
                    f"tensor '{size[1]}'",
                    f"{symbol} = fingerprint.{name} = {fingerprint[name]}",
                    Said(f"{symbol} = {size[0]}"),
                )


def _check_dtype(path, tensor: str, layer: int, rule: TensorRule, dtype: str, here) -> None:
    if dtype not in rule.dtypes:
        fail(path, f"tensor '{tensor}'", "dtype " + " or ".join(rule.dtypes), dtype)
    if rule.paired is not None:
        paired_dtype, other = rule.paired
        if (dtype == paired_dtype) != (other in here):
            expected = (
                f"{paired_dtype} with 'layers.{layer}.{other}'"
                if other in here
                else f"a dtype other than {paired_dtype} without 'layers.{layer}.{other}'"
            )
            fail(path, f"tensor '{tensor}'", expected, dtype)


def _check_shape(path, tensor: str, rule: TensorRule, shape: tuple, dims: dict) -> None:
    def known(symbol: str) -> tuple[int, str] | None:
        return dims.get(symbol) if symbol in rule.binds else _size(symbol, dims)

    def expected() -> str:
        sizes = [f"{s}={known(s)[0]} (from {known(s)[1]})" for s in rule.shape if known(s)]
        return f"shape [{', '.join(rule.shape)}]" + (f" with {', '.join(sizes)}" if sizes else "")

    if len(shape) != len(rule.shape):
        fail(path, f"tensor '{tensor}'", expected(), shape)
    for symbol, n in zip(rule.shape, shape):
        size = known(symbol)
        if size is None and symbol in rule.binds:
            if n < 1:
                fail(path, f"tensor '{tensor}'", f"at least 1 along {symbol}", shape)
            dims[symbol] = (n, tensor)
        elif size is None or size[0] != n:
            fail(path, f"tensor '{tensor}'", expected(), shape)


def _size(symbol: str, dims: dict) -> tuple[int, str] | None:
    """The size a shape symbol stands for (``"C+1"``: C's plus one), or None if not fixed."""
    base, _, plus = symbol.partition("+")
    known = dims.get(base) or dims.get(DIM_DEFAULTS.get(base, ""))
    return None if known is None else (known[0] + int(plus or 0), known[1])


def _check_values(
    path, tensor, rule: TensorRule, x: np.ndarray, dtype: str, dims, fixed: dict[str, int]
) -> None:
    if dtype in FLOAT_DTYPES and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        fail(path, f"tensor '{tensor}'", "finite values", Said(f"{bad} NaN or infinite values"))
    if rule.positive and not (x > 0).all():
        fail(path, f"tensor '{tensor}'", "values > 0", f"minimum {x.min()!r}")
    sizes = {**fixed, **{s: n for s, (n, _) in dims.items()}}
    problem = rule.check(x, sizes) if rule.check else None
    if problem:
        fail(path, f"tensor '{tensor}'", "valid values", problem)


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


def json_field(path, meta: dict[str, str], name: str):
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
            fail(path, f"metadata '{name}'", "a JSON object", MISSING)
        fields[name] = json_field(path, meta, name) if name in meta else {}
        if not isinstance(fields[name], dict):
            fail(path, f"metadata '{name}'", "a JSON object", fields[name])
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
            fail(
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
                fail(path, f"metadata '{where}'", f"an entry for memorised layer {layer}", MISSING)
    extra = sorted(set(fields["bandwidth"]) - {str(layer) for layer in layers}, key=int)
    if extra:
        fail(
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
            fail(path, f"metadata 'fingerprint.{name}'", expected, fp.get(name, MISSING))
    if fp["top_k"] > fp["num_experts"]:
        fail(
            path,
            "metadata 'fingerprint.top_k'",
            f"at most num_experts ({fp['num_experts']})",
            fp["top_k"],
        )


def _check_bandwidth(path, bandwidth: dict) -> None:
    for layer, tau in bandwidth.items():
        if not _LAYER.fullmatch(layer):
            fail(path, "metadata 'bandwidth'", "layer numbers as keys", layer)
        if not _positive(tau):
            fail(path, f"metadata 'bandwidth.{layer}'", "a finite number > 0", tau)


def _check_retrieval(path, retrieval: dict) -> None:
    try:
        KNNConfig.from_memory_defaults(retrieval)
    except (TypeError, ValueError) as e:
        raise MemoryFormatError(f"{path}: metadata 'retrieval': {e}") from None


def _check_build(path, build: dict, where: str = "build") -> None:
    if "config" in build:
        if not isinstance(build["config"], dict):
            fail(path, f"metadata '{where}.config'", "a JSON object", build["config"])
        try:
            BuildConfig.from_record(build["config"])
        except (TypeError, ValueError) as e:
            raise MemoryFormatError(f"{path}: metadata '{where}.config': {e}") from None
    if build.get("eta") is not None and not _positive(build["eta"]):
        fail(path, f"metadata '{where}.eta'", "a finite number > 0 or null", build["eta"])
    if "parts" in build:
        parts = build["parts"]
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            fail(path, f"metadata '{where}.parts'", "a list of objects", parts)
        for i, part in enumerate(parts):
            _check_build(path, part, f"{where}.parts[{i}]")


def _check_compression(path, compression: dict) -> None:
    if compression.get("keys", "float32") not in KEY_DTYPES:
        fail(path, "metadata 'compression.keys'", " or ".join(KEY_DTYPES), compression["keys"])


METADATA_CHECKS = {
    "fingerprint": _check_fingerprint,
    "bandwidth": _check_bandwidth,
    "build": _check_build,
    "retrieval": _check_retrieval,
    "compression": _check_compression,
}
