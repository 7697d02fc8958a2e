"""Smaller memories: key precision, PCA-projected keys, and pruning entries the router agrees with.

Each function returns a new Memory. The file format (file_format.py) stores int8 keys with one
scale per row and projected keys with their projection; retrieval (retrieval/layer_memory.py)
projects queries before searching, so a compressed memory attaches like any other. Keys held
in memory are what a saved and reloaded file gives (int8 keys stay int8 with their row scales,
and search reads them in that form), so retrieval results do not change when the memory is
saved. Every function drops a stored IVF index (it indexes the old keys).
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.specs import SPECS
from .bandwidth import calibrate_bandwidth
from .file_format import MemoryMismatchError, quantize_rows
from .fingerprint import fingerprint
from .ivf import train_ivf
from .probe import record_probe, router_logits, top_sets
from .store import Memory
from .validation import validate_for_model
from .values import top_values

KEY_FORMATS = ("float32", "float16", "bfloat16", "int8")
VALUE_FORMATS = ("float32", "float16", "bfloat16")
PRUNE_CRITERION = "top-k expert set of the stored logits equals the router's own for the key"


def compress(
    memory: Memory,
    *,
    keys: str | None = None,
    pca: int | None = None,
    prune: bool = False,
    model: nn.Module | None = None,
    values: str | None = None,
    ivf: int | None = None,
    top_experts: int | None = None,
) -> Memory:
    """Prune (needs ``model``), then project to ``pca`` dimensions, then store keys as ``keys``
    and values (the optimised logits) as ``values``; ``top_experts``: keep only that many
    experts' logits per entry (memory/values.py; float16 unless ``values`` says otherwise);
    ``ivf``: train an inverted-file index of that many lists (0: a size-dependent default)
    over the final keys and store it.

    With ``model`` (the model the memory was built with) a memory without a router probe gets
    one first, so the compressed memory can still say how far another router is (probe.py).
    """
    if prune and model is None:
        raise ValueError("pruning needs the model the memory was built with (--model)")
    if model is not None:
        validate_for_model(memory, model)
    memory = replace(memory, probe=dict(memory.probe), path=None)  # a copy, even if unchanged
    if model is not None and not memory.probe:
        if not memory.routers_differing(fingerprint(model)):
            record_probe(memory, model)
    if prune:
        memory = prune_agreeing(memory, model)
    if pca is not None:
        memory = project(memory, pca)
    if keys is not None:
        memory = convert_keys(memory, keys)
    if top_experts is not None:
        memory = keep_top_experts(memory, top_experts, values or "float16")
    elif values is not None:
        memory = convert_values(memory, values)
    if ivf is not None:
        memory = with_ivf(memory, ivf or None)
    return memory


def convert_values(memory: Memory, fmt: str) -> Memory:
    """Optimised logits stored as float32, float16 or bfloat16 (mixing reads them in float32)."""
    if fmt not in VALUE_FORMATS:
        raise ValueError(f"value format must be one of {VALUE_FORMATS}, got {fmt!r}")
    logits = {layer: v.astype(getattr(mx, fmt)) for layer, v in memory.logits.items()}
    rest = {layer: v.astype(getattr(mx, fmt)) for layer, v in memory.rest_logits.items()}
    mx.eval(logits, rest)
    return replace(
        memory,
        logits=logits,
        rest_logits=rest,
        path=None,
        compression={**memory.compression, "values": fmt},
    )


def keep_top_experts(memory: Memory, m: int, fmt: str = "float16") -> Memory:
    """Values stored as each entry's top-``m`` experts' logits plus one rest logit, in
    ``fmt`` (memory/values.py says what is kept exactly). Already top-m layers are rebuilt
    dense first, so ``m`` may only shrink what they keep."""
    if fmt not in VALUE_FORMATS:
        raise ValueError(f"value format must be one of {VALUE_FORMATS}, got {fmt!r}")
    score = router_score(memory.fingerprint.get("model_type"))
    dtype = getattr(mx, fmt)
    logits, experts, rest = {}, {}, {}
    for layer in memory.layers:
        e, top, r = top_values(memory.dense_logits(layer), m, score)
        experts[layer] = mx.array(e)
        logits[layer], rest[layer] = mx.array(top).astype(dtype), mx.array(r).astype(dtype)
    mx.eval(logits, experts, rest)
    compression = {**memory.compression, "values": fmt, "top_experts": m}
    return replace(
        memory,
        logits=logits,
        top_experts=experts,
        rest_logits=rest,
        path=None,
        compression=compression,
    )


def router_score(model_type: str | None) -> str:
    """The dense score (softmax or sigmoid) of the architecture a memory was built for."""
    if model_type not in SPECS:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {', '.join(SPECS)}"
        )
    return SPECS[model_type].score


def with_ivf(memory: Memory, nlist: int | None = None) -> Memory:
    """The memory with an inverted-file index per layer (memory/ivf.py) over its keys."""
    ivf = {}
    for layer in memory.layers:
        ivf[layer] = train_ivf(mx.array(memory.dense_keys(layer)), nlist)
    return replace(memory, ivf=ivf, path=None)


def encode_keys(keys: np.ndarray, fmt: str) -> tuple[mx.array, mx.array | None]:
    """Float32 keys [M, d] stored as ``fmt``: (keys, row scales or None)."""
    if fmt == "int8":
        q, scale = quantize_rows(keys)
        return mx.array(q), mx.array(scale)
    return mx.array(keys).astype(getattr(mx, fmt)), None


def _encoded(dense: dict[int, np.ndarray], fmt: str) -> dict:
    """``replace`` arguments that set every layer's keys from float32 ``dense`` keys."""
    keys, scales = {}, {}
    for layer, k in dense.items():
        keys[layer], scale = encode_keys(k, fmt)
        if scale is not None:
            scales[layer] = scale
    mx.eval(keys, scales)
    return dict(keys=keys, key_scales=scales, ivf={}, path=None)


def convert_keys(memory: Memory, fmt: str) -> Memory:
    """Keys stored as float32, float16, bfloat16, or int8 with one scale per row."""
    if fmt not in KEY_FORMATS:
        raise ValueError(f"key format must be one of {KEY_FORMATS}, got {fmt!r}")
    dense = {layer: memory.dense_keys(layer) for layer in memory.layers}
    if fmt == "float16":
        largest = max(float(np.abs(k).max()) for k in dense.values())
        if largest > float(np.finfo(np.float16).max):
            raise ValueError(f"keys reach {largest:g}, beyond float16; use bfloat16 or int8")
    compression = {**memory.compression, "keys": fmt}
    return replace(memory, **_encoded(dense, fmt), compression=compression)


def _key_format(memory: Memory) -> str:
    fmt = memory.compression.get("keys")
    if fmt in KEY_FORMATS:
        return fmt
    return str(next(iter(memory.keys.values())).dtype).removeprefix("mlx.core.")


def pca_basis(keys: np.ndarray, dim: int, fit_rows: int = 50_000) -> np.ndarray:
    """Orthonormal rows [dim, d]: the keys' first dim - 1 principal directions and the part of
    their mean outside them. Distances between projected keys are those within this subspace;
    keeping the mean direction keeps dot products, and so cosine similarity, close too."""
    if len(keys) > fit_rows:
        keys = keys[np.linspace(0, len(keys) - 1, fit_rows).round().astype(int)]
    keys = keys.astype(np.float64)
    mean = keys.mean(0)
    centred = keys - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)
    principal = vectors[:, ::-1][:, : dim - 1].T
    rest = mean - principal.T @ (principal @ mean)
    norm = np.linalg.norm(rest)
    last = rest / norm if norm > 1e-8 * max(np.linalg.norm(mean), 1e-30) else vectors[:, -dim]
    return np.concatenate([principal, last[None]]).astype(np.float32)


def project(memory: Memory, dim: int) -> Memory:
    """Keys projected to ``dim`` dimensions by a PCA fitted on each layer's keys.

    The projection is stored per layer and applied to queries before search. The RBF bandwidth
    is recalibrated in the projected space: scaled by the ratio of the calibration statistic
    (median nearest-neighbour squared distance) after and before, so a tuned bandwidth keeps
    its relation to the keys.
    """
    fmt = _key_format(memory)
    dense, projection, bandwidth, kept = {}, {}, {}, {}
    for layer in memory.layers:
        old = memory.dense_keys(layer)
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim < old.shape[1]:
            raise ValueError(
                f"layer {layer}: PCA dim must be an integer in [1, {old.shape[1] - 1}], got {dim!r}"
            )
        basis = pca_basis(old, dim)
        new = old @ basis.T
        centred_old, centred_new = old - old.mean(0), new - new.mean(0)
        kept[str(layer)] = float((centred_new**2).sum() / max((centred_old**2).sum(), 1e-30))
        dense[layer] = new
        before = memory.projection.get(layer)
        basis = mx.array(basis)
        projection[layer] = basis if before is None else basis @ before.astype(mx.float32)
        bandwidth[layer] = memory.bandwidth[layer]
    out = replace(memory, **_encoded(dense, fmt), projection=projection)
    for layer in out.layers:  # in the projected space as stored (after quantisation)
        ratio = calibrate_bandwidth(out.dense_keys(layer)) / calibrate_bandwidth(
            memory.dense_keys(layer)
        )
        bandwidth[layer] = memory.bandwidth[layer] * ratio
    pca = {"dim": dim, "variance_kept": kept}
    return replace(out, bandwidth=bandwidth, compression={**memory.compression, "pca": pca})


def prune_agreeing(memory: Memory, model: nn.Module, batch: int = 4096) -> Memory:
    """Drop entries whose stored logits select the same top-k experts as the router's own
    logits for that key: retrieval changes nothing there except the weights of the experts.
    Layers left empty are dropped (their router runs alone)."""
    differ = memory.routers_differing(fingerprint(model))
    if differ:
        raise MemoryMismatchError(
            f"pruning compares with the router the memory was built with; this model's router "
            f"weights differ in layers {differ}"
        )
    keys, scales, logits, bandwidth, removed = {}, {}, {}, {}, {}
    experts, rest = {}, {}
    for layer in memory.layers:
        if layer in memory.projection:
            raise ValueError(f"layer {layer}: keys are projected (PCA); prune before projecting")
        k, v, dense = memory.keys[layer], memory.logits[layer], memory.dense_keys(layer)
        same = []
        for start in range(0, k.shape[0], batch):
            z = router_logits(model, layer, mx.array(dense[start : start + batch]))
            span = np.arange(start, min(start + batch, k.shape[0]))
            stored = mx.array(memory.dense_logits(layer, span))
            same.append((top_sets(model, layer, z) == top_sets(model, layer, stored)).all(-1))
        keep = np.nonzero(~np.concatenate(same))[0]
        removed[str(layer)] = int(k.shape[0] - len(keep))
        if len(keep):
            rows = mx.array(keep.astype(np.int32))
            keys[layer], logits[layer] = k[rows], v[rows]
            row_tables = (
                (memory.key_scales, scales),
                (memory.top_experts, experts),
                (memory.rest_logits, rest),
            )
            for table, out in row_tables:
                if layer in table:
                    out[layer] = table[layer][rows]
            bandwidth[layer] = memory.bandwidth[layer]
    if not keys:
        raise ValueError("every entry agrees with the router; nothing would be left to retrieve")
    mx.eval(keys, logits)
    prune = {"criterion": PRUNE_CRITERION, "removed": removed}
    return replace(
        memory,
        keys=keys,
        key_scales=scales,
        ivf={},
        logits=logits,
        top_experts=experts,
        rest_logits=rest,
        bandwidth=bandwidth,
        probe={layer: p for layer, p in memory.probe.items() if layer in keys},
        path=None,
        compression={**memory.compression, "prune": prune},
    )
