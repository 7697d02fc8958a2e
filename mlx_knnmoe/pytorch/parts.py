"""The torch builder's batches and gradient-pass results by part of the plan, as eta tuning,
calibration and re-capture read them (pytorch/pipeline.py, pytorch/refine.py)."""

from __future__ import annotations

import torch

from ..build.calibrate_rule import Eta
from ..build.plan import BatchPlan, stored_logits
from ..config import BuildConfig
from ..data.batches import make_batch
from .store import Memory


def torch_batch(examples, rows: list[int], keep: str, device) -> tuple[torch.Tensor, ...]:
    """(tokens, loss mask, keep mask) [B, L] of ``mlx_knnmoe.data.batches.make_batch``."""
    batch = make_batch(examples, rows, keep)
    tokens = torch.from_numpy(batch.tokens).long()
    masks = (torch.from_numpy(m).float() for m in (batch.loss_mask, batch.keep_mask))
    return tokens.to(device), *(m.to(device) for m in masks)


class Parts:
    """The gradient pass's results by part of the plan (0: reference examples, 1: held out,
    None: all), as eta tuning, calibration and re-capture read them (build/refine.py's
    ``Parts``): per-layer keys, stored logits at an eta (one, or one per layer), memories and
    batches on the model's device."""

    def __init__(self, examples, plan: BatchPlan, results: list, config: BuildConfig, device):
        self.examples, self.plan, self.results = examples, plan, results
        self.config, self.device = config, device

    def _cat(self, part: int | None, pick) -> dict[int, torch.Tensor]:
        chosen = [pick(r) for p, r in self.results if part is None or p == part]
        return {layer: torch.cat([c[layer] for c in chosen]) for layer in chosen[0]}

    def keys(self, part: int | None) -> dict[int, torch.Tensor]:
        return self._cat(part, lambda r: r.keys)

    def logits(self, part: int | None, eta: Eta) -> dict[int, torch.Tensor]:
        z = self._cat(part, lambda r: r.router_logits)
        computed = [self._cat(part, lambda r, e=e: r.logits[e]) for e in self.plan.etas]
        at = eta if isinstance(eta, dict) else dict.fromkeys(z, eta)
        steps, etas = self.config.steps, self.plan.etas
        return {i: stored_logits(z[i], [c[i] for c in computed], at[i], steps, etas) for i in z}

    def memory(self, part: int | None, eta: Eta, fp: dict) -> Memory:
        return Memory(self.keys(part), self.logits(part, eta), fp)

    def batches(self, part: int | None) -> list[tuple[torch.Tensor, ...]]:
        """(tokens, loss mask, keep mask) of each batch of ``part``."""
        keep, groups = self.config.keep, self.plan.groups
        chosen = [rows for p, rows in groups if part is None or p == part]
        return [torch_batch(self.examples, rows, keep, self.device) for rows in chosen]
