"""One MoE layer's memory at inference: its search index and the value tables mixing reads.

Keys stay in their stored form (float16/bfloat16, or int8 with row scales) and values in
their stored dtype (top-m values as they are stored: memory/values.py); search and mixing
cast or rebuild only what they read for a token.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..arch.routing import RoutingMap
from ..config import KNNConfig
from ..memory.ivf import train_ivf
from ..memory.store import Memory
from .mixing import weights_and_confidence
from .search import ExactSearch, HnswSearch, IvfSearch, choose_search

TIMING_QUERIES = 8  # decode-sized searches timed per candidate when `auto` measures
ASSIGN_CHUNK = 16384  # entries whose assignment is derived at once (union mixing)


class LayerMemory:
    """Keys and optimised logits of one layer, with tables derived once per routing map."""

    def __init__(
        self,
        layer: int,
        keys: mx.array,
        logits: mx.array,
        bandwidth: float,
        rmap: RoutingMap,
        cache_dir: Path | None = None,
        projection: mx.array | None = None,
        key_scales: mx.array | None = None,
        ivf: tuple[mx.array, mx.array] | None = None,
        top_experts: mx.array | None = None,
        rest_logits: mx.array | None = None,
    ):
        self.layer = layer
        self.keys = keys
        self.key_scales = key_scales
        self.ivf = ivf  # (centroids, lists); trained at first use of an ivf search if None
        self.logits = logits  # [M, N], or [M, m] with top_experts [M, m] and rest_logits [M]
        self.top_experts = None if top_experts is None else top_experts.astype(mx.int32)
        self.rest_logits = rest_logits
        self.bandwidth = bandwidth
        self.rmap = rmap
        self.cache_dir = cache_dir
        # PCA-compressed memories: keys are x @ P.T, queries are projected the same way
        self._projection_t = None if projection is None else projection.astype(mx.float32).T
        self._assignment = None
        self.searchers: dict = {}  # built search indexes by (kind, similarity, nprobe)
        self.chosen: dict = {}  # auto: the measured choice by (similarity, nprobe)

    @classmethod
    def from_memory(
        cls, memory: Memory, layer: int, rmap: RoutingMap, cache_dir: Path | None = None
    ) -> "LayerMemory":
        return cls(
            layer,
            memory.keys[layer],
            memory.logits[layer],
            memory.bandwidth[layer],
            rmap,
            cache_dir,
            memory.projection.get(layer),
            memory.key_scales.get(layer),
            memory.ivf.get(layer),
            memory.top_experts.get(layer),
            memory.rest_logits.get(layer),
        )

    def with_logits(self, logits: mx.array) -> "LayerMemory":
        """The same keys and search index with other values (eta tuning changes only those)."""
        other = copy.copy(self)  # shares the searchers
        other.logits = logits
        other.top_experts = other.rest_logits = None
        other._assignment = None
        return other

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def neighbour_logits(self, idx: mx.array) -> mx.array:
        """The optimised logits of the neighbours ``idx`` [T, K]: [T, K, N] float32 (top-m
        values rebuilt for these rows only: the rest logit, the stored experts' over it)."""
        if self.top_experts is None:
            return self.logits[idx].astype(mx.float32)
        rest = self.rest_logits[idx].astype(mx.float32)[..., None]
        dense = mx.broadcast_to(rest, (*idx.shape, self.rmap.n_experts))
        top = self.logits[idx].astype(mx.float32)
        return mx.put_along_axis(dense, self.top_experts[idx], top, axis=-1)

    def neighbour_scores(self, idx: mx.array) -> mx.array:
        """Dense router scores of the neighbours' optimised logits, [T, K, N]."""
        return self.rmap.scores(self.neighbour_logits(idx))

    def assignment(self) -> tuple[mx.array, mx.array]:
        """The model's sparse assignment of every entry's optimised logits, [M, k] twice."""
        if self._assignment is None:
            parts = []
            for start in range(0, self.size, ASSIGN_CHUNK):  # top-m: never all rows dense
                rows = mx.arange(start, min(start + ASSIGN_CHUNK, self.size))
                inds, weights = self.rmap.select(self.neighbour_logits(rows))
                parts.append((inds, weights.astype(mx.float32)))
                mx.eval(parts[-1])
            self._assignment = tuple(mx.concatenate(p) for p in zip(*parts))
            mx.eval(*self._assignment)
        return self._assignment

    def dense_keys(self) -> mx.array:
        """float32 keys (int8 keys times their scales), for index training and hnswlib."""
        keys = self.keys.astype(mx.float32)
        return keys if self.key_scales is None else keys * self.key_scales[:, None]

    def _build(self, kind: str, config: KNNConfig):
        if kind == "exact":
            return ExactSearch(self.keys, config.similarity, self.key_scales)
        if kind == "ivf":
            if self.ivf is None:
                self.ivf = train_ivf(self.dense_keys())
            centroids, lists = self.ivf
            return IvfSearch(
                self.keys, config.similarity, centroids, lists, config.nprobe, self.key_scales
            )
        return HnswSearch(
            np.asarray(self.dense_keys()),
            config.similarity,
            cache_dir=self.cache_dir,
            name=f"layer{self.layer}",
            ef=config.ef,
        )

    def _search(self, kind: str, config: KNNConfig):
        key = (kind, config.similarity, config.nprobe if kind == "ivf" else None)
        if key not in self.searchers:
            self.searchers[key] = self._build(kind, config)
        return self.searchers[key]

    def searcher(self, config: KNNConfig):
        kind = choose_search(config.search, self.size, int(self.keys.shape[1]))
        if kind == "measure":
            choice = (config.similarity, config.nprobe)
            if choice not in self.chosen:
                self.chosen[choice] = self._faster(("exact", "ivf"), config)
            kind = self.chosen[choice]
        return self._search(kind, config)

    def _faster(self, kinds: tuple[str, ...], config: KNNConfig) -> str:
        """The kind whose decode-sized search (one query) takes least time on this layer."""
        query = self.dense_keys()[:1]
        cost = {}
        for kind in kinds:
            search = self._search(kind, config)
            mx.eval(search(query, config.k))  # warm up
            tic = time.perf_counter()
            for _ in range(TIMING_QUERIES):
                mx.eval(search(query, config.k))
            cost[kind] = time.perf_counter() - tic
        best = min(cost, key=cost.get)
        for kind in kinds:  # keep only the index that is used
            if kind != best:
                self.searchers.pop((kind, config.similarity, None), None)
                self.searchers.pop((kind, config.similarity, config.nprobe), None)
        return best

    def retrieve(self, queries: mx.array, config: KNNConfig):
        """For queries [T, d]: neighbour indices [T, K], weights w [T, K], lambda [T]."""
        if self._projection_t is not None:
            queries = queries.astype(mx.float32) @ self._projection_t
        elif queries.shape[-1] != self.keys.shape[1]:
            raise ValueError(
                f"layer {self.layer}: memory keys have dim {self.keys.shape[1]}, router inputs "
                f"have dim {queries.shape[-1]} (a PCA-compressed memory needs its projection: "
                "build the layer with LayerMemory.from_memory)"
            )
        idx, dist = self.searcher(config)(queries, config.k)
        tau = config.bandwidth if config.bandwidth is not None else self.bandwidth
        w, lam = weights_and_confidence(dist, config.similarity, tau, config.lambda_scale)
        return idx, w, lam
