"""The arithmetic of kNN-MoE mixing in torch (mirrors ``mlx_knnmoe.retrieval.mixing``).

Shapes: T tokens, K neighbours, N experts. Distances come from ``search``: squared L2 for
``rbf``, cosine (larger is nearer) for ``cosine``.
"""

from __future__ import annotations

import math

import torch

from ..config import SIMILARITIES


def similarity(dist: torch.Tensor, kind: str, bandwidth: float) -> torch.Tensor:
    """Similarity in [0, 1]: exp(-d^2 / tau) for rbf, max(0, cos) for cosine."""
    if kind == "rbf":
        return torch.exp(-dist.clamp_min(0.0) / bandwidth)
    if kind == "cosine":
        return dist.clamp(0.0, 1.0)
    raise ValueError(f"unknown similarity '{kind}'; expected one of {SIMILARITIES}")


def confidence(sim: torch.Tensor, scale: float) -> torch.Tensor:
    """lambda = clip(scale * mean_j s_j, 0, 1), shape [T]."""
    return (scale * sim.mean(dim=-1)).clamp(0.0, 1.0)


def neighbour_weights(sim: torch.Tensor) -> torch.Tensor:
    """w_j = s_j / sum_j s_j; uniform where every similarity is 0 (lambda is 0 there)."""
    total = sim.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(sim, 1.0 / sim.shape[-1])
    return torch.where(total > 0, sim / total.clamp_min(1e-30), uniform)


def blend(
    own: torch.Tensor, lam: torch.Tensor, weights: torch.Tensor, neighbours: torch.Tensor
) -> torch.Tensor:
    """(1 - lambda) own + lambda sum_j w_j neighbours_j, for own [T, N], neighbours [T, K, N]."""
    mem = (weights[..., None] * neighbours).sum(dim=1)
    lam = lam[:, None]
    return (1.0 - lam) * own + lam * mem


def router_confident(scores: torch.Tensor, signal: str, threshold: float) -> torch.Tensor:
    """[T] True where the router's own dense scores [T, N] are confident by ``signal``:
    normalised entropy below ``threshold`` (``entropy``), or top-1 minus top-2 score above
    it (``margin``)."""
    if signal == "entropy":
        p = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
        return h / math.log(scores.shape[-1]) < threshold
    if signal == "margin":
        top2 = torch.topk(scores, 2, dim=-1).values
        return (top2[..., 0] - top2[..., 1]) > threshold
    raise ValueError(f"unknown skip signal '{signal}'; expected entropy or margin")
