"""Where the router of each transformers MoE architecture sits, and its routing map in torch.

transformers 5 gives every supported MoE block a router module that computes the logits
``z = x W^T (+ b)`` and the sparse assignment itself, returning ``(z, weights, indices)``.
kNN-MoE must run that same map on other logits (the builder's ``r``, the mixed logits), so
each map is restated here from the router's own attributes, read at call time (so the
builder's dense surrogate can change ``top_k``). ``tests/test_pytorch.py`` checks each
restatement against the router module's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.specs import model_type
from ..arch.specs import spec_for as shared_spec_for

Select = Callable[[nn.Module, torch.Tensor, torch.dtype], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class RoutingMap:
    """The model's map from router logits [T, N] to (indices [T, k], weights [T, k])."""

    router: nn.Module  # the model's own router: top_k and the other settings live on it
    n_experts: int
    score: str  # "softmax" or "sigmoid": the dense score the logits stand for
    _select: Select

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def select(self, logits: torch.Tensor, dtype: torch.dtype | None = None):
        """(indices, weights), as ``mlx_knnmoe.arch.RoutingMap.select`` returns them (the
        router module itself returns weights first); weights in ``dtype`` where the router
        casts them to its logits' dtype."""
        weights, indices = self._select(self.router, logits, dtype or logits.dtype)
        return indices, weights

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, -1)

    def inverse(self, scores: torch.Tensor) -> torch.Tensor:
        """Logits whose dense score is ``scores`` (log p for softmax, logit(s) for sigmoid)."""
        if self.score == "sigmoid":
            s = scores.clamp(1e-30, 1.0 - 1e-7)
            return torch.log(s) - torch.log1p(-s)
        return torch.log(scores.clamp_min(1e-30))


def _softmax_topk(always_norm: bool) -> Select:
    """OLMoE, Qwen2-MoE, Qwen3-MoE (norm_topk_prob), Mixtral (always renormalised)."""

    def select(router, z, dtype):
        p = torch.softmax(z.float(), dim=-1)
        w, idx = torch.topk(p, router.top_k, dim=-1)
        if always_norm or router.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(dtype), idx

    return select


def _topk_softmax(router, z, dtype):
    """GPT-OSS: top-k of the logits, softmax over the chosen ones."""
    top, idx = torch.topk(z, router.top_k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def _grouped_sigmoid(router, z, dtype):
    """DeepSeek-V3: sigmoid scores, groups and experts chosen with the correction bias, the
    chosen experts weighted by their plain scores (renormalised), times the scaling factor."""
    scores = torch.sigmoid(z.float())
    choice = scores + router.e_score_correction_bias
    n_group = router.num_group
    grouped = choice.view(-1, n_group, router.num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, router.num_experts)
    choice = choice.masked_fill(~mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * router.routed_scaling_factor, idx


@dataclass(frozen=True)
class RouterSpec:
    """``block``: attribute of a decoder layer holding the MoE block; ``gate``: the router
    module in the block (dense layers lack it and are skipped); ``score``, ``select``: the
    routing map."""

    block: str
    gate: str
    score: str
    select: Select


SPECS: dict[str, RouterSpec] = {
    "olmoe": RouterSpec("mlp", "gate", "softmax", _softmax_topk(False)),
    "qwen2_moe": RouterSpec("mlp", "gate", "softmax", _softmax_topk(False)),
    "qwen3_moe": RouterSpec("mlp", "gate", "softmax", _softmax_topk(False)),
    "mixtral": RouterSpec("mlp", "gate", "softmax", _softmax_topk(True)),
    "gpt_oss": RouterSpec("mlp", "router", "softmax", _topk_softmax),
    "deepseek_v3": RouterSpec("mlp", "gate", "sigmoid", _grouped_sigmoid),
}

# the attention projections whose outputs carry keys and values (token gradient scope)
KV_PROJECTIONS = ("k_proj", "v_proj", "kv_a_proj_with_mqa")


def spec_for(model: nn.Module) -> RouterSpec:
    return shared_spec_for(model, SPECS, "mlx_knnmoe.pytorch")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("cannot find the decoder layers (model.model.layers)")
    return layers


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> MoE block, for every layer that routes (dense layers skipped)."""
    spec = spec_for(model)
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, spec.block, None)
        if block is not None and hasattr(block, spec.gate) and hasattr(block, "experts"):
            found[i] = block
    if not found:
        raise ValueError(f"no MoE layers found in this {model_type(model)} model")
    return found


def own_router(block: nn.Module, spec: RouterSpec) -> nn.Module:
    """The block's router module, looking through a KNNRouter wrapper."""
    gate = getattr(block, spec.gate)
    return getattr(gate, "inner", gate)


def routing_map(block: nn.Module, spec: RouterSpec) -> RoutingMap:
    router = own_router(block, spec)
    return RoutingMap(router, int(router.num_experts), spec.score, spec.select)
