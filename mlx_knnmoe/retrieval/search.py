"""Nearest-neighbour search over one layer's memory keys.

``ExactSearch`` is one MLX matmul plus argpartition and stays inside the lazy graph;
``IvfSearch`` reads only the lists of the nearest centroids (memory/ivf.py trains them), also
inside the graph. Both read keys in their stored form (``KeyRows``).
``HnswSearch`` uses hnswlib; the router input has to come to the host, so it costs one sync
per MoE layer per forward, and pays off only for large memories. Both return, for queries
[T, d], neighbour indices [T, K] and distances [T, K]: squared L2 for ``rbf``, cosine for
``cosine`` (larger is nearer).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import hnswlib
import mlx.core as mx
import numpy as np

from ..atomic_files import remove_stale_temporaries, temporary_path
from ..config import SEARCHES

# `auto` searches exactly below this many key elements (entries x dim) per layer; above it,
# the layer times exact and IVF search on its own keys at first use and keeps the faster
# (LayerMemory.searcher). hnswlib needs a host sync per layer, so `auto` never picks it.
AUTO_MEASURE_MIN_ELEMENTS = 1_000_000


class KeyRows:
    """Keys [..., M, d] in the form search reads them, never expanded to float32.

    Float keys stay in their dtype (the query is cast to it). int8 keys with one scale per
    row are repacked once as MLX 8-bit quantised rows with the same values (q + 128, bias
    -128 * scale per group), so ``mx.quantized_matmul`` / ``mx.gather_qmm`` read them.
    """

    def __init__(self, keys: mx.array, scales: mx.array | None = None):
        self.dim = int(keys.shape[-1])
        self.quantised = scales is not None
        if not self.quantised:
            self.keys = keys
            return
        self.pad = -self.dim % 32  # quantised rows need d a multiple of the group size
        if self.pad:
            keys = mx.pad(keys, [(0, 0)] * (keys.ndim - 1) + [(0, self.pad)])
        width = keys.shape[-1]
        self.group = 128 if width % 128 == 0 else 64 if width % 64 == 0 else 32
        self.packed = mx.view((keys.astype(mx.int16) + 128).astype(mx.uint8), mx.uint32)
        scales = scales.astype(mx.float32)[..., None]
        self.scales = mx.broadcast_to(scales, (*scales.shape[:-1], width // self.group)) * 1.0
        self.biases = -128.0 * self.scales
        mx.eval(self.packed, self.scales, self.biases)

    def _query(self, q: mx.array) -> mx.array:
        if self.quantised:
            return mx.pad(q, [(0, 0), (0, self.pad)]) if self.pad else q
        return q.astype(self.keys.dtype)

    def dots(self, q: mx.array) -> mx.array:
        """q [T, d] float32 against keys [M, d]: [T, M] float32."""
        q = self._query(q)
        if self.quantised:
            return mx.quantized_matmul(
                q, self.packed, self.scales, self.biases, True, self.group, 8
            )
        return (q @ self.keys.T).astype(mx.float32)

    def gather_dots(self, q: mx.array, lists: mx.array) -> mx.array:
        """q [T, d] against the key lists [C, L, d] chosen by ``lists`` [T, P]: [T, P, L]."""
        q = self._query(q)[:, None, None, :]
        if self.quantised:
            out = mx.gather_qmm(
                q,
                self.packed,
                self.scales,
                self.biases,
                rhs_indices=lists,
                transpose=True,
                group_size=self.group,
                bits=8,
            )
        elif self.keys.dtype == mx.float32:
            out = mx.gather_mm(q, self.keys.swapaxes(-1, -2), rhs_indices=lists)
        else:  # gather_mm takes float32 only: gather the chosen lists, then one batched matmul
            out = q @ self.keys[lists].swapaxes(-1, -2)
        return out.reshape(lists.shape[0], lists.shape[1], -1).astype(mx.float32)

    @property
    def nbytes(self) -> int:
        if self.quantised:
            return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes
        return self.keys.nbytes


def row_norms(keys: mx.array, scales: mx.array | None, chunk: int = 16384) -> mx.array:
    """Euclidean norm of every key row [..., M] (dequantised chunk by chunk)."""
    flat = keys.reshape(-1, keys.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start : start + chunk].astype(mx.float32)
        out.append(mx.sqrt((rows * rows).sum(-1)))
        mx.eval(out[-1])
    norms = mx.concatenate(out).reshape(keys.shape[:-1])
    return norms * mx.abs(scales.astype(mx.float32)) if scales is not None else norms


_FAR = 1e30  # the score of an empty list slot


def _score_terms(norms: mx.array, similarity: str, valid: mx.array | None = None):
    """(factor, offset) with score = factor * q.k + offset, smaller is nearer: squared L2
    less |q|^2 for rbf, minus the cosine (times |q|) for cosine. Invalid slots never win."""
    if similarity == "cosine":
        factor, offset = -1.0 / mx.maximum(norms, 1e-12), mx.zeros_like(norms)
    else:
        factor, offset = mx.full(norms.shape, -2.0), norms * norms
    if valid is not None:
        offset = mx.where(valid, offset, mx.array(_FAR, dtype=mx.float32))
        factor = mx.where(valid, factor, 0.0)
    return factor, offset


def _nearest_k(score: mx.array, k: int) -> mx.array:
    if k < score.shape[-1]:
        return mx.argpartition(score, kth=k - 1, axis=-1)[:, :k]
    return mx.broadcast_to(mx.arange(score.shape[-1]), score.shape)


def _distances(q: mx.array, best: mx.array, similarity: str) -> mx.array:
    """Squared L2 (rbf) or cosine from the best scores [T, K] of queries q [T, d]."""
    if similarity == "cosine":
        return -best / mx.maximum(mx.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    return best + (q * q).sum(axis=-1, keepdims=True)


class ExactSearch:
    """Every key, read in its stored form (float dtype or int8 with row scales)."""

    def __init__(self, keys: mx.array, similarity: str, scales: mx.array | None = None):
        self.similarity = similarity
        self.rows = KeyRows(keys, scales)
        self.factor, self.offset = _score_terms(row_norms(keys, scales), similarity)
        mx.eval(self.factor, self.offset)

    def __call__(self, queries: mx.array, k: int) -> tuple[mx.array, mx.array]:
        q = queries.astype(mx.float32)
        score = self.factor * self.rows.dots(q) + self.offset
        idx = _nearest_k(score, min(k, score.shape[-1]))
        return idx, _distances(q, mx.take_along_axis(score, idx, axis=-1), self.similarity)


class IvfSearch:
    """Inverted-file search: the ``nprobe`` lists whose centroids are nearest, read in the
    keys' stored form. Everything is MLX ops, so it stays in the lazy graph (no host sync)."""

    def __init__(
        self,
        keys: mx.array,
        similarity: str,
        centroids: mx.array,
        lists: mx.array,
        nprobe: int,
        scales: mx.array | None = None,
    ):
        self.similarity = similarity
        self.nprobe = min(nprobe, centroids.shape[0])
        valid = lists >= 0
        rows = mx.where(valid, lists, 0).astype(mx.int32)
        self.ids = rows  # [C, L] memory row of each slot
        flat = rows.reshape(-1)
        slot_keys = keys[flat].reshape(*rows.shape, keys.shape[-1])  # keys in list order
        slot_scales = None if scales is None else scales[flat].reshape(rows.shape)
        self.rows = KeyRows(slot_keys, slot_scales)
        self.factor, self.offset = _score_terms(
            row_norms(slot_keys, slot_scales), similarity, valid
        )
        self.centroids_t = centroids.astype(mx.float32).T
        self.centroid_sq = (self.centroids_t * self.centroids_t).sum(0)
        mx.eval(self.ids, self.factor, self.offset, self.centroids_t, self.centroid_sq)

    def __call__(self, queries: mx.array, k: int) -> tuple[mx.array, mx.array]:
        q = queries.astype(mx.float32)
        t = q.shape[0]
        probe = _nearest_k(self.centroid_sq - 2.0 * (q @ self.centroids_t), self.nprobe)
        probe = probe.astype(mx.uint32)
        score = self.factor[probe] * self.rows.gather_dots(q, probe) + self.offset[probe]
        score = score.reshape(t, -1)
        slot = _nearest_k(score, min(k, score.shape[-1]))
        idx = mx.take_along_axis(self.ids[probe].reshape(t, -1), slot, axis=-1)
        return idx, _distances(q, mx.take_along_axis(score, slot, axis=-1), self.similarity)


def keys_hash(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, dtype=np.float32).tobytes()).hexdigest()


class HnswSearch:
    """hnswlib index of one layer, cached in ``cache_dir`` under the hash of its keys."""

    def __init__(
        self,
        keys: np.ndarray,
        similarity: str,
        cache_dir: Path | None = None,
        name: str = "layer",
        ef: int = 64,
        m: int = 16,
        ef_construction: int = 100,
    ):
        self.similarity = similarity
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        space = "cosine" if similarity == "cosine" else "l2"
        self.index = hnswlib.Index(space=space, dim=keys.shape[1])
        prefix = f"{name}-{space}-m{m}-"
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"{prefix}{keys_hash(keys)[:16]}-n{len(keys)}.bin"
        self.loaded_from_cache = "none"  # or "all", or "prefix": grown by the new keys only
        start = 0
        if path is not None:
            remove_stale_temporaries(path.parent)
        if path is not None and path.exists() and _load_verified(self.index, path, keys):
            self.loaded_from_cache, start = "all", len(keys)
        elif path is not None and (grown := _cached_prefix(keys, Path(cache_dir), prefix)):
            old, start = grown
            if _load_verified(self.index, old, keys, start):
                self.loaded_from_cache = "prefix"
            else:
                start = 0
        if start == 0:
            self.index = hnswlib.Index(space=space, dim=keys.shape[1])
            self.index.init_index(
                max_elements=len(keys), ef_construction=ef_construction, M=m, random_seed=0
            )
        if start < len(keys):
            self.index.add_items(keys[start:], np.arange(start, len(keys)))
            if path is not None:
                _save_index(self.index, path, stale_prefix=prefix)
        self.size = len(keys)
        self.ef = ef

    def __call__(self, queries: mx.array, k: int) -> tuple[mx.array, mx.array]:
        k = min(k, self.size)
        self.index.set_ef(max(self.ef, k))  # ef is not saved with the index
        q = np.asarray(queries.astype(mx.float32))
        labels, dist = self.index.knn_query(q, k=k)
        if self.similarity == "cosine":
            dist = 1.0 - dist
        return mx.array(labels.astype(np.int32)), mx.array(dist.astype(np.float32))


def _cached_prefix(keys: np.ndarray, cache_dir: Path, prefix: str) -> tuple[Path, int] | None:
    """A cached index of the first n < len(keys) keys (a memory that has since grown by
    appending): hnswlib can add the rest to it instead of building from scratch."""
    for old in sorted(cache_dir.glob(prefix + "*-n*.bin")):
        digest, _, n = old.stem[len(prefix) :].rpartition("-n")
        if n.isdigit() and 0 < int(n) < len(keys) and keys_hash(keys[: int(n)])[:16] == digest:
            return old, int(n)
    return None


def _load_verified(index, path: Path, keys: np.ndarray, n: int | None = None) -> bool:
    """Load the cached index of the first ``n`` keys (all by default) and check it: element
    count, dimension, and a few keys found as their own nearest neighbours. A corrupt index or
    one of other keys is deleted with a one-line notice, to be rebuilt."""
    n = len(keys) if n is None else n
    try:
        index.load_index(str(path), max_elements=len(keys))
        problem = _index_problem(index, keys[:n])
    except Exception as e:  # hnswlib: "Index seems to be corrupted or unsupported", ...
        problem = f"unreadable ({e})"
    if problem is None:
        return True
    warnings.warn(f"{path}: {problem}; rebuilding the hnsw index", stacklevel=4)
    path.unlink(missing_ok=True)
    return False


def _index_problem(index, keys: np.ndarray) -> str | None:
    if index.get_current_count() != len(keys):
        return f"holds {index.get_current_count()} entries, the keys are {len(keys)}"
    if index.dim != keys.shape[1]:
        return f"has dimension {index.dim}, the keys have {keys.shape[1]}"
    probe = np.unique(np.linspace(0, len(keys) - 1, min(len(keys), 8)).round().astype(int))
    index.set_ef(max(64, len(probe)))
    labels, dist = index.knn_query(keys[probe], k=1)
    found = labels[:, 0].astype(int)
    scale = 1.0 + (keys[probe] ** 2).sum(-1)  # a key's distance to itself is 0 up to rounding
    same = [i == j or np.array_equal(keys[i], keys[j]) for i, j in zip(probe, found)]
    if not all(same) or (np.abs(dist[:, 0]) > 1e-4 * scale).any():
        return "does not hold these keys (an index of other keys)"
    return None


def _save_index(index, path: Path, stale_prefix: str) -> None:
    """Write atomically and drop indexes of older keys for the same layer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(stale_prefix + "*.bin"):
        if old != path:
            old.unlink()
    tmp = temporary_path(path)
    index.save_index(str(tmp))
    os.replace(tmp, path)


def choose_search(kind: str, n_entries: int, dim: int) -> str:
    """The search to build: ``kind`` itself, or for ``auto`` exact for small layers and
    ``measure`` (time exact against ivf) for the rest."""
    if kind not in SEARCHES:
        raise ValueError(f"unknown search '{kind}'; expected one of {SEARCHES}")
    if kind != "auto":
        return kind
    return "exact" if n_entries * dim < AUTO_MEASURE_MIN_ELEMENTS else "measure"
