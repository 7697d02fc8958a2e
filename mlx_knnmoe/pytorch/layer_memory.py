"""One MoE layer's memory at inference: exact search and the value tables mixing reads."""

from __future__ import annotations

import torch

from ..config import KNNConfig
from .arch import RoutingMap
from .mixing import confidence, neighbour_weights, similarity
from .search import ExactSearch
from .store import Memory


class LayerMemory:
    """Keys and optimised logits of one layer on the model's device, with the dense scores
    and sparse assignments of the logits derived once."""

    def __init__(self, memory: Memory, layer: int, rmap: RoutingMap, device: torch.device):
        self.layer = layer
        self.keys = torch.from_numpy(memory.dense_keys(layer)).to(device)
        self.logits = torch.from_numpy(memory.dense_logits(layer)).to(device)  # top-m: rebuilt
        self.bandwidth = float(memory.bandwidth[layer])
        self.rmap = rmap
        p = memory.projection.get(layer)
        self._projection_t = None if p is None else p.to(device).float().T
        self._scores: torch.Tensor | None = None
        self._assignment: tuple[torch.Tensor, torch.Tensor] | None = None
        self._search: dict[str, ExactSearch] = {}

    def scores(self) -> torch.Tensor:
        """Dense router scores of every entry's optimised logits, [M, N]."""
        if self._scores is None:
            self._scores = self.rmap.scores(self.logits)
        return self._scores

    def assignment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's sparse assignment of every entry's logits: (indices, weights) [M, k]."""
        if self._assignment is None:
            idx, w = self.rmap.select(self.logits)
            self._assignment = (idx, w.float())
        return self._assignment

    def retrieve(self, queries: torch.Tensor, config: KNNConfig):
        """For queries [T, d]: neighbour indices [T, K], weights w [T, K], lambda [T].
        Search is always exact here (``config.search`` is ignored)."""
        if self._projection_t is not None:
            queries = queries.float() @ self._projection_t
        elif queries.shape[-1] != self.keys.shape[1]:
            raise ValueError(
                f"layer {self.layer}: memory keys have dim {self.keys.shape[1]}, router inputs "
                f"have dim {queries.shape[-1]}"
            )
        if config.similarity not in self._search:
            self._search[config.similarity] = ExactSearch(self.keys, config.similarity)
        idx, dist = self._search[config.similarity](queries, config.k)
        tau = config.bandwidth if config.bandwidth is not None else self.bandwidth
        sim = similarity(dist, config.similarity, tau)
        return idx, neighbour_weights(sim), confidence(sim, config.lambda_scale)
