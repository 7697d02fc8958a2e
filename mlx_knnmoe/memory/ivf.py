"""An inverted-file index over one layer's keys, trained with MLX: k-means centroids and, per
centroid, the rows of its entries in a list of fixed capacity (padded with -1).

Fixed capacity keeps search a gather of whole lists (retrieval/search.py, ``IvfSearch``):
an entry whose nearest list is full goes to its next nearest list with room, nearest
entries first, so a list never holds more than ``capacity`` times the mean.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

CHOICES = 4  # nearest centroids tried per entry before falling back to any list with room


def default_nlist(entries: int) -> int:
    """About sqrt(M) lists, a power of two, at least 1 and at most M / 8."""
    target = max(1, min(math.sqrt(entries), entries / 8))
    return 1 << max(0, round(math.log2(target)))


def _nearest(x: mx.array, centroids: mx.array, r: int, chunk: int = 8192):
    """For rows x [M, d]: the r nearest centroids [M, r] (nearest first) and squared distances."""
    c_sq = (centroids * centroids).sum(-1)
    inds, dists = [], []
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        d = c_sq - 2.0 * (rows @ centroids.T) + (rows * rows).sum(-1, keepdims=True)
        if r < d.shape[-1]:
            top = mx.argpartition(d, kth=r - 1, axis=-1)[:, :r]
        else:
            top = mx.broadcast_to(mx.arange(d.shape[-1]), d.shape)
        td = mx.take_along_axis(d, top, axis=-1)
        order = mx.argsort(td, axis=-1)
        inds.append(mx.take_along_axis(top, order, axis=-1))
        dists.append(mx.take_along_axis(td, order, axis=-1))
        mx.eval(inds[-1], dists[-1])
    return np.array(mx.concatenate(inds)), np.array(mx.concatenate(dists))


def kmeans(keys: mx.array, nlist: int, iterations: int = 10, sample: int = 64, seed: int = 0):
    """Lloyd's k-means in MLX on at most ``sample`` rows per centroid; centroids [C, d]."""
    rng = np.random.default_rng(seed)
    m = keys.shape[0]
    rows = rng.choice(m, size=min(m, sample * nlist), replace=False)
    x = keys[mx.array(np.sort(rows).astype(np.int32))].astype(mx.float32)
    centroids = x[mx.array(rng.choice(x.shape[0], nlist, replace=False).astype(np.int32))]
    for _ in range(iterations):
        assign = mx.array(_nearest(x, centroids, 1)[0][:, 0].astype(np.int32))
        counts = mx.zeros((nlist,)).at[assign].add(1.0)
        sums = mx.zeros(centroids.shape).at[assign].add(x)
        # an empty centroid keeps its place
        centroids = mx.where(counts[:, None] > 0, sums / mx.maximum(counts, 1)[:, None], centroids)
        mx.eval(centroids)
    return centroids


def fill_lists(choice: np.ndarray, dist: np.ndarray, nlist: int, capacity: int) -> np.ndarray:
    """Entries into lists of ``capacity`` rows: each to its nearest list with room, nearest
    entries first (choice, dist [M, r]: ranked nearest centroids). Returns lists [C, capacity]
    of entry rows, -1 where empty."""
    m = choice.shape[0]
    if nlist * capacity < m:
        raise ValueError(f"{nlist} lists of {capacity} cannot hold {m} entries")
    home = np.full(m, -1, dtype=np.int64)
    counts = np.zeros(nlist, dtype=np.int64)
    for j in range(choice.shape[1]):
        todo = np.nonzero(home < 0)[0]
        if not len(todo):
            break
        c, d = choice[todo, j], dist[todo, j]
        order = np.lexsort((d, c))
        c_sorted = c[order]
        first = np.searchsorted(c_sorted, c_sorted, side="left")
        rank = np.arange(len(order)) - first
        take = rank < (capacity - counts[c_sorted])
        home[todo[order[take]]] = c_sorted[take]
        counts += np.bincount(c_sorted[take], minlength=nlist)
    for row in np.nonzero(home < 0)[0]:  # rare: every ranked choice was full
        room = np.nonzero(counts < capacity)[0]
        home[row] = room[0]
        counts[room[0]] += 1
    lists = np.full((nlist, capacity), -1, dtype=np.int32)
    order = np.argsort(home, kind="stable")
    slot = np.arange(m) - np.searchsorted(home[order], home[order], side="left")
    lists[home[order], slot] = order
    return lists


def train_ivf(
    keys: mx.array,
    nlist: int | None = None,
    capacity_factor: float = 1.5,
    iterations: int = 10,
    seed: int = 0,
) -> tuple[mx.array, mx.array]:
    """Centroids [C, d] (float32) and lists [C, L] (int32, -1 padded) for float keys [M, d]."""
    m = keys.shape[0]
    nlist = min(nlist or default_nlist(m), m)
    keys = keys.astype(mx.float32)
    centroids = kmeans(keys, nlist, iterations, seed=seed)
    choice, dist = _nearest(keys, centroids, min(CHOICES, nlist))
    capacity = max(1, math.ceil(capacity_factor * m / nlist))
    lists = fill_lists(choice, dist, nlist, capacity)
    used = int((lists >= 0).sum(1).max())  # trim to the fullest list
    return centroids, mx.array(lists[:, :used])
