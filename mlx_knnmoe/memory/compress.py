"""Smaller memories: key precision, PCA-projected keys, and pruning entries the router agrees with.

Each function returns a new Memory. The file format (file_format.py) stores int8 keys with one
scale per row and projected keys with their projection; retrieval (retrieval/layer_memory.py)
projects queries before searching, so a compressed memory attaches like any other. Keys held
in memory are what a saved and reloaded file gives (int8 keys dequantised), so retrieval
results do not change when the memory is saved.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .bandwidth import calibrate_bandwidth
from .file_format import MemoryMismatchError, dequantize_rows, quantize_rows
from .fingerprint import fingerprint
from .probe import record_probe, router_logits, top_sets
from .store import Memory
from .validation import validate_for_model

KEY_FORMATS = ("float32", "float16", "bfloat16", "int8")
PRUNE_CRITERION = "top-k expert set of the stored logits equals the router's own for the key"


def compress(
    memory: Memory,
    *,
    keys: str | None = None,
    pca: int | None = None,
    prune: bool = False,
    model: nn.Module | None = None,
) -> Memory:
    """Prune (needs ``model``), then project to ``pca`` dimensions, then store keys as ``keys``.

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
    return memory


def _encode(keys: mx.array, fmt: str) -> mx.array:
    """Keys as a file stored in ``fmt`` gives them back."""
    if fmt == "int8":
        return mx.array(dequantize_rows(*quantize_rows(Memory.to_numpy(keys))))
    return keys.astype(getattr(mx, fmt))


def convert_keys(memory: Memory, fmt: str) -> Memory:
    """Keys stored as float32, float16, bfloat16, or int8 with one scale per row."""
    if fmt not in KEY_FORMATS:
        raise ValueError(f"key format must be one of {KEY_FORMATS}, got {fmt!r}")
    if fmt == "float16":
        largest = max(float(mx.abs(k).max()) for k in memory.keys.values())
        if largest > float(np.finfo(np.float16).max):
            raise ValueError(f"keys reach {largest:g}, beyond float16; use bfloat16 or int8")
    keys = {layer: _encode(k, fmt) for layer, k in memory.keys.items()}
    mx.eval(keys)
    return replace(memory, keys=keys, path=None, compression={**memory.compression, "keys": fmt})


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
    keys, projection, bandwidth, kept = {}, {}, {}, {}
    for layer, k in memory.keys.items():
        old = np.array(k.astype(mx.float32))
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim < old.shape[1]:
            raise ValueError(
                f"layer {layer}: PCA dim must be an integer in [1, {old.shape[1] - 1}], got {dim!r}"
            )
        basis = pca_basis(old, dim)
        new = old @ basis.T
        centred_old, centred_new = old - old.mean(0), new - new.mean(0)
        kept[str(layer)] = float((centred_new**2).sum() / max((centred_old**2).sum(), 1e-30))
        keys[layer] = _encode(mx.array(new), fmt)
        before = memory.projection.get(layer)
        basis = mx.array(basis)
        projection[layer] = basis if before is None else basis @ before.astype(mx.float32)
        ratio = calibrate_bandwidth(Memory.to_numpy(keys[layer])) / calibrate_bandwidth(
            Memory.to_numpy(k)
        )
        bandwidth[layer] = memory.bandwidth[layer] * ratio
    pca = {"dim": dim, "variance_kept": kept}
    return replace(
        memory,
        keys=keys,
        projection=projection,
        bandwidth=bandwidth,
        path=None,
        compression={**memory.compression, "pca": pca},
    )


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
    keys, logits, bandwidth, removed = {}, {}, {}, {}
    for layer in memory.layers:
        if layer in memory.projection:
            raise ValueError(f"layer {layer}: keys are projected (PCA); prune before projecting")
        k, v = memory.keys[layer], memory.logits[layer]
        same = []
        for start in range(0, k.shape[0], batch):
            z = router_logits(model, layer, k[start : start + batch])
            stored = v[start : start + batch].astype(mx.float32)
            same.append((top_sets(model, layer, z) == top_sets(model, layer, stored)).all(-1))
        keep = np.nonzero(~np.concatenate(same))[0]
        removed[str(layer)] = int(k.shape[0] - len(keep))
        if len(keep):
            rows = mx.array(keep.astype(np.int32))
            keys[layer], logits[layer] = k[rows], v[rows]
            bandwidth[layer] = memory.bandwidth[layer]
    if not keys:
        raise ValueError("every entry agrees with the router; nothing would be left to retrieve")
    mx.eval(keys, logits)
    prune = {"criterion": PRUNE_CRITERION, "removed": removed}
    return replace(
        memory,
        keys=keys,
        logits=logits,
        bandwidth=bandwidth,
        probe={layer: p for layer, p in memory.probe.items() if layer in keys},
        path=None,
        compression={**memory.compression, "prune": prune},
    )
