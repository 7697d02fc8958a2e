"""Exact nearest-neighbour search over one layer's keys: one matmul and a top-k.

Returns, for queries [T, d], neighbour indices [T, K] and distances [T, K]: squared L2 for
``rbf``, cosine for ``cosine`` (larger is nearer), as ``mlx_knnmoe.retrieval.search.ExactSearch``.
"""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ExactSearch:
    def __init__(self, keys: torch.Tensor, similarity: str):
        self.similarity = similarity
        keys = keys.float()
        if similarity == "cosine":
            keys = _unit(keys)
        self.keys_t = keys.T.contiguous()
        self.sq_norms = (keys * keys).sum(dim=-1)

    def __call__(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        k = min(k, self.keys_t.shape[1])
        if self.similarity == "cosine":
            cos = _unit(q) @ self.keys_t
            dist, idx = torch.topk(cos, k, dim=-1)
            return idx, dist
        score = (q * q).sum(dim=-1, keepdim=True) - 2.0 * (q @ self.keys_t) + self.sq_norms
        neg, idx = torch.topk(-score, k, dim=-1)
        return idx, -neg
