"""The router wrapper in torch: the model's own routing, plus retrieval and mixing.

``attach`` swaps each MoE block's router module for a ``KNNRouter`` that calls it and returns
``(logits, weights, indices)`` as the router does, so the block's code (experts, shared
experts, scaling) is untouched:

- ``topk``: the model's map on ``score^-1((1 - lambda) p(z) + lambda sum_j w_j p(r_j))``;
- ``logits``: the model's map on ``(1 - lambda) z + lambda sum_j w_j r_j``;
- ``union``: the router's own experts with weights ``(1 - lambda) s_i``, and a
  ``KNNExperts`` wrapper around the block's experts module adds the memory's experts
  ``pi(r_j)`` with weights ``lambda w_j a_e(r_j)`` (a second call of the same experts), so
  the block's output is ``(1 - lambda) sum_i s_i y_i + lambda m``, what ``mlx_knnmoe``'s
  KNNExperts computes.

Tokens whose lambda is 0 keep the router's own values (``torch.where``). ``detach`` puts the
original routers back.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..config import KNNConfig
from ..retrieval.wiring import Wiring
from .arch import RoutingMap, moe_blocks, routing_map, spec_for
from .layer_memory import LayerMemory
from .mixing import blend, router_confident
from .store import Memory, validate_for_model


class KNNRouter(nn.Module):
    def __init__(self, inner: nn.Module, rmap: RoutingMap, layer: int):
        super().__init__()
        self.inner = inner
        self.rmap = rmap
        self.layer = layer
        self.memory: LayerMemory | None = None
        self.config = KNNConfig()
        self.capture: list | None = None  # (router input x [T, d], logits z [T, N]) per call
        self.record: list | None = None  # (lambda [T], experts that run [T, k]) per call
        self.free: torch.Tensor | None = None  # builder: logits r replacing the router's
        self.offset: torch.Tensor | None = None  # builder: r = z.detach() + offset
        self.pending = None  # union: the memory's (indices, weights) for KNNExperts

    def forward(self, hidden_states: torch.Tensor):
        own = self.inner(hidden_states)
        building = self.free is not None or self.offset is not None
        if self.memory is None and self.capture is None and self.record is None and not building:
            return own
        z, own_w, own_idx = own
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.capture is not None:
            self.capture.append((x.detach(), z.detach().float()))
        if self.free is not None:
            return self._replace(self.free.reshape(z.shape), own_w.dtype)
        if self.offset is not None:
            return self._replace(z.detach().float() + self.offset.reshape(z.shape), own_w.dtype)
        mem, cfg = self.memory, self.config
        if mem is None or cfg.lambda_scale == 0:
            self._note(torch.zeros(z.shape[0], device=z.device), own_idx)
            return own
        idx, w, lam = mem.retrieve(x, cfg)
        if cfg.skip is not None:  # selective retrieval: confident tokens keep their routing
            sure = router_confident(self.rmap.scores(z), cfg.skip, cfg.skip_threshold)
            lam = torch.where(sure, torch.zeros_like(lam), lam)
        active = (lam > 0)[:, None]
        if cfg.mix == "union":
            return self._union(own, idx, w, lam, active)
        if cfg.mix == "logits":
            mixed = blend(z.float(), lam, w, mem.logits[idx])
        else:  # topk: blend dense scores; the model's map runs on the blend's logits
            mixed = self.rmap.inverse(blend(self.rmap.scores(z), lam, w, mem.scores()[idx]))
        mixed = mixed.to(z.dtype)
        new_idx, new_w = self.rmap.select(mixed, own_w.dtype)
        indices = torch.where(active, new_idx, own_idx)
        self._note(lam, indices)
        return torch.where(active, mixed, z), torch.where(active, new_w, own_w), indices

    def _replace(self, r: torch.Tensor, dtype: torch.dtype):
        """The builder's logits r (float32) replace x W^T; the model's own map runs on them
        and gives its weights in the dtype the router gives them."""
        indices, weights = self.rmap.select(r, dtype)
        return r, weights, indices

    def _union(self, own, idx, w, lam, active):
        z, own_w, own_idx = own
        mem_idx, mem_w = self.memory.assignment()
        t = idx.shape[0]
        mem_idx = mem_idx[idx].reshape(t, -1)  # [T, K*k]
        mem_w = (w[..., None] * mem_w[idx]).reshape(t, -1)
        lam_ = lam[:, None]
        mem_w = torch.where(active, lam_ * mem_w, torch.zeros_like(mem_w))
        self.pending = (mem_idx, mem_w.to(own_w.dtype))
        self._note(lam, own_idx)
        return z, torch.where(active, (1.0 - lam_) * own_w, own_w).to(own_w.dtype), own_idx

    def _note(self, lam: torch.Tensor, indices: torch.Tensor) -> None:
        if self.record is not None:
            self.record.append((lam.detach(), indices.detach()))


class KNNExperts(nn.Module):
    """Adds the memory's experts in ``union`` mode (a second call of the block's own experts
    with the memory's indices and weights); passes through otherwise. Tokens with lambda 0
    get zero weights there, so their output is the plain block's, bit for bit."""

    def __init__(self, inner: nn.Module, router: KNNRouter):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_router", router)  # a reference, not a child module

    def forward(self, hidden_states, top_k_index, top_k_weights):
        y = self.inner(hidden_states, top_k_index, top_k_weights)
        pending, self._router.pending = self._router.pending, None
        if pending is None:
            return y
        return y + self.inner(hidden_states, *pending)


# -- installing and removing ---------------------------------------------------------------
class _TorchWiring(Wiring):
    """Wrappers on transformers models: a ``KNNRouter`` in each router's place,
    ``KNNExperts`` in the experts'; each layer's memory on the model's device."""

    memory_type = Memory

    def wrap(self, model: nn.Module) -> dict[int, KNNRouter]:
        spec, found = spec_for(model), {}
        for layer, block in moe_blocks(model).items():
            wrapper = KNNRouter(getattr(block, spec.gate), routing_map(block, spec), layer)
            setattr(block, spec.gate, wrapper)
            block.experts = KNNExperts(block.experts, wrapper)
            found[layer] = wrapper
        return found

    def unwrap(self, model: nn.Module, found: dict[int, KNNRouter]) -> None:
        spec, blocks = spec_for(model), moe_blocks(model)
        for layer, router in found.items():
            setattr(blocks[layer], spec.gate, router.inner)
            blocks[layer].experts = blocks[layer].experts.inner

    def validate(self, memory: Memory, model: nn.Module) -> None:
        validate_for_model(memory, model)

    def layer_memory(
        self, model: nn.Module, memory: Memory, layer: int, router: KNNRouter
    ) -> LayerMemory:
        return LayerMemory(memory, layer, router.rmap, next(model.parameters()).device)


_WIRING = _TorchWiring()
routers, install, attached = _WIRING.routers, _WIRING.install, _WIRING.attached
attach, configure, detach = _WIRING.attach, _WIRING.configure, _WIRING.detach


@contextmanager
def _recording(model: nn.Module, attr: str):
    """Per MoE layer, a list the wrapper appends to through its attribute ``attr``."""
    found = install(model)
    records: dict[int, list] = {layer: [] for layer in found}
    for layer, router in found.items():
        setattr(router, attr, records[layer])
    try:
        yield records
    finally:
        for router in found.values():
            setattr(router, attr, None)


def capture_router_inputs(model: nn.Module):
    """Record (router input [T, d], router logits [T, N]) per MoE layer and call."""
    return _recording(model, "capture")


def record_routing(model: nn.Module):
    """Record (lambda [T], the router's selected experts [T, k]) per MoE layer and call;
    in ``union`` mode the experts are the router's own (the memory's run besides)."""
    return _recording(model, "record")
