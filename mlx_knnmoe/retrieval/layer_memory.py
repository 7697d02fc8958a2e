"""One MoE layer's memory at inference: its search index and the value tables mixing reads."""

from __future__ import annotations

import copy
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..arch.routing import RoutingMap
from ..config import KNNConfig
from ..memory.store import Memory
from .mixing import confidence, neighbour_weights, similarity
from .search import ExactSearch, HnswSearch, choose_search


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
    ):
        self.layer = layer
        self.keys = keys
        self.logits = logits.astype(mx.float32)
        self.bandwidth = bandwidth
        self.rmap = rmap
        self.cache_dir = cache_dir
        # PCA-compressed memories: keys are x @ P.T, queries are projected the same way
        self._projection_t = None if projection is None else projection.astype(mx.float32).T
        self._scores = None
        self._assignment = None
        self.searchers: dict = {}  # built search indexes by (kind, similarity)

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
        )

    def with_logits(self, logits: mx.array) -> "LayerMemory":
        """The same keys and search index with other values (eta tuning changes only those)."""
        other = copy.copy(self)  # shares the searchers
        other.logits = logits.astype(mx.float32)
        other._scores = other._assignment = None
        return other

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def scores(self) -> mx.array:
        """Dense router scores of every entry's optimised logits, [M, N]."""
        if self._scores is None:
            self._scores = self.rmap.scores(self.logits)
            mx.eval(self._scores)
        return self._scores

    def assignment(self) -> tuple[mx.array, mx.array]:
        """The model's sparse assignment of every entry's optimised logits, [M, k] twice."""
        if self._assignment is None:
            inds, weights = self.rmap.select(self.logits)
            self._assignment = (inds, weights.astype(mx.float32))
            mx.eval(*self._assignment)
        return self._assignment

    def searcher(self, config: KNNConfig):
        kind = choose_search(config.search, self.size, int(self.keys.shape[1]))
        key = (kind, config.similarity)
        if key not in self.searchers:
            if kind == "exact":
                self.searchers[key] = ExactSearch(self.keys, config.similarity)
            else:
                self.searchers[key] = HnswSearch(
                    np.asarray(self.keys.astype(mx.float32)),
                    config.similarity,
                    cache_dir=self.cache_dir,
                    name=f"layer{self.layer}",
                    ef=config.ef,
                )
        return self.searchers[key]

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
        sim = similarity(dist, config.similarity, tau)
        return idx, neighbour_weights(sim), confidence(sim, config.lambda_scale)
