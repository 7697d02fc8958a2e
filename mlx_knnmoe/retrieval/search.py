"""Nearest-neighbour search over one layer's memory keys.

``ExactSearch`` is one MLX matmul plus argpartition and stays inside the lazy graph.
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

from ..config import SEARCHES
from ..memory.file_format import remove_stale_temporaries, temporary_path

# `auto` uses hnswlib above this many key elements (entries x dim) per layer. On the CPU
# hnswlib already wins at 10k x 1024 (BENCHMARKS.md); the GPU threshold, where one matmul is
# cheap, is a guess until it is measured on Apple silicon.
AUTO_HNSW_MIN_ELEMENTS = {"cpu": 4_000_000, "gpu": 100_000_000}


class ExactSearch:
    def __init__(self, keys: mx.array, similarity: str):
        self.similarity = similarity
        keys = keys.astype(mx.float32)
        if similarity == "cosine":
            keys = keys / mx.maximum(mx.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        self.keys_t = keys.T
        self.sq_norms = (keys * keys).sum(axis=-1)
        mx.eval(self.keys_t, self.sq_norms)

    def __call__(self, queries: mx.array, k: int) -> tuple[mx.array, mx.array]:
        q = queries.astype(mx.float32)
        k = min(k, self.keys_t.shape[1])
        if self.similarity == "cosine":
            q = q / mx.maximum(mx.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
            score = -(q @ self.keys_t)
        else:
            score = (q * q).sum(axis=-1, keepdims=True) - 2.0 * (q @ self.keys_t) + self.sq_norms
        if k < score.shape[-1]:
            idx = mx.argpartition(score, kth=k - 1, axis=-1)[:, :k]
        else:
            idx = mx.broadcast_to(mx.arange(score.shape[-1]), score.shape)
        dist = mx.take_along_axis(score, idx, axis=-1)
        return idx, (-dist if self.similarity == "cosine" else dist)


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


def choose_search(kind: str, n_entries: int, dim: int, device: str | None = None) -> str:
    if kind not in SEARCHES:
        raise ValueError(f"unknown search '{kind}'; expected one of {SEARCHES}")
    if kind != "auto":
        return kind
    if device is None:
        device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    return "hnsw" if n_entries * dim >= AUTO_HNSW_MIN_ELEMENTS[device] else "exact"
