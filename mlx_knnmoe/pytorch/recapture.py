"""Keys re-captured with the memory attached, in torch: the MLX builder's build/recapture.py
(docs/METHOD.md, "Keys captured with the memory attached") on a transformers model."""

from __future__ import annotations

import torch
from torch import nn

from .router import attach, capture_router_inputs
from .store import Memory


def router_inputs(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], bar=None
) -> dict[int, torch.Tensor]:
    """Each MoE layer's router inputs at the stored positions of ``batches`` ((tokens,
    keep mask) [B, L]), in order, on the host, with whatever memory is attached."""
    parts: dict[int, list[torch.Tensor]] = {}
    for tokens, keep_mask in batches:
        with torch.no_grad(), capture_router_inputs(model) as records:
            model(input_ids=tokens[:, :-1], use_cache=False)
        rows = torch.nonzero(keep_mask[:, :-1].reshape(-1) > 0).squeeze(-1).to(tokens.device)
        for layer, rec in records.items():
            parts.setdefault(layer, []).append(torch.cat([r[0] for r in rec])[rows].cpu())
        if bar is not None:
            bar.update(1)
    return {layer: torch.cat(p) for layer, p in parts.items()}


def capture_with(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], config):
    """The ``capture(memory, bar)`` that ``build.stages.recapture_passes`` calls: ``memory``
    attached with ``config``, the router inputs of ``batches`` in its keys' dtypes."""

    def capture(memory: Memory, bar) -> dict[int, torch.Tensor]:
        attach(model, memory, config, validate=False)
        inputs = router_inputs(model, batches, bar)
        return {layer: inputs[layer].to(k.dtype) for layer, k in memory.keys.items()}

    return capture
