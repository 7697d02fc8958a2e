"""``build_memory`` in torch: the same examples, batches, stored positions, eta handling and
file as ``mlx_knnmoe.build_memory`` (build/pipeline.py; without resumable, distributed or
appending builds). The plan, the stored logits and the build record come from the shared
``mlx_knnmoe.build.plan``, so both sides store the same positions in the same order.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..build.plan import plan_batches, resolve_surrogate, scan_eta_grid, stored_logits
from ..build.stages import output_path, read_dataset, recapture_passes, record_build
from ..config import BuildConfig, KNNConfig
from ..data.batches import make_batch
from ..data.examples import Dataset
from ..memory.bandwidth import calibrate_bandwidth
from .eta_choice import heldout_nll
from .gradient import auto_surrogate, optimise_batch
from .recapture import capture_with
from .router import attached, detach
from .store import Memory, fingerprint


def torch_batch(examples, rows: list[int], keep: str, device) -> tuple[torch.Tensor, ...]:
    """(tokens, loss mask, keep mask) [B, L] of ``mlx_knnmoe.data.batches.make_batch``."""
    batch = make_batch(examples, rows, keep)
    tokens = torch.from_numpy(batch.tokens).long()
    masks = (torch.from_numpy(m).float() for m in (batch.loss_mask, batch.keep_mask))
    return tokens.to(device), *(m.to(device) for m in masks)


def _on_cpu(res):
    """Finished batches wait on the host, so a long build does not fill the GPU."""
    res.keys = {k: v.cpu() for k, v in res.keys.items()}
    res.router_logits = {k: v.cpu() for k, v in res.router_logits.items()}
    res.logits = {e: {k: v.cpu() for k, v in d.items()} for e, d in res.logits.items()}
    return res


def build_memory(
    model: nn.Module,
    tokenizer,
    data: str | Path | Dataset,
    config: BuildConfig | None = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    retrieval: KNNConfig | None = None,
    progress: bool = True,
    **settings,
) -> Memory:
    """Build (and with ``out`` save) a memory for a transformers model on its own device.
    Arguments as ``mlx_knnmoe.build_memory``, re-captured keys included, without calibration
    (the MLX builder's step 9 in docs/METHOD.md)."""
    started = time.perf_counter()
    config = replace(config or BuildConfig(calibrate=False), **settings)
    if config.calibrate:
        raise ValueError("calibrate is built by the MLX builder only (pass calibrate=False)")
    out = output_path(out, force)
    if attached(model):
        raise ValueError("the model has a memory attached; detach it before building")
    retrieval = retrieval or KNNConfig()
    dataset = read_dataset(data, tokenizer, config)
    examples = dataset.examples
    surrogate = resolve_surrogate(config.surrogate, lambda: auto_surrogate(model))
    plan = plan_batches([len(e.tokens) for e in examples], config)
    device = next(model.parameters()).device
    results, loss = [], 0.0
    total = sum(len(examples[i].tokens) for _, rows in plan.groups for i in rows)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="build", disable=not progress) as bar:
        for part, rows in plan.groups:
            tensors = torch_batch(examples, rows, config.keep, device)
            res = optimise_batch(model, *tensors, plan.etas, config.steps, config.scope, surrogate)
            results.append((part, _on_cpu(res)))
            loss += res.loss_before
            bar.update(sum(len(examples[i].tokens) for i in rows))

    def cat(part: int | None, pick) -> dict[int, torch.Tensor]:
        chosen = [pick(r) for p, r in results if part is None or p == part]
        return {layer: torch.cat([c[layer] for c in chosen]) for layer in chosen[0]}

    def logits_of(part: int | None, eta: float) -> dict[int, torch.Tensor]:
        z = cat(part, lambda r: r.router_logits)
        computed = [cat(part, lambda r, e=e: r.logits[e]) for e in plan.etas]
        return {
            i: stored_logits(z[i], [c[i] for c in computed], eta, config.steps, plan.etas)
            for i in z
        }

    fp = fingerprint(model)
    tuning, eta = None, config.eta
    if config.auto_eta:
        keys = cat(0, lambda r: r.keys)
        bandwidth = {i: calibrate_bandwidth(Memory.to_numpy(k)) for i, k in keys.items()}
        heldout = [
            torch_batch(examples, rows, config.keep, device)[:2] for p, rows in plan.groups if p
        ]

        def score(eta: float) -> float:
            memory = Memory(keys, logits_of(0, eta), fp, bandwidth)
            return heldout_nll(model, heldout, memory, retrieval)

        plain = heldout_nll(model, heldout, None, retrieval)
        tuning = scan_eta_grid(score, plain, config.eta_grid, config.eta_patience)
        eta = tuning["eta"]
    memory = Memory(cat(None, lambda r: r.keys), logits_of(None, eta), fp)
    framework = f"torch {torch.__version__} on {device.type}"
    chosen = dict(eta=eta, tuning=tuning, surrogate=surrogate, loss_before=loss)
    if config.recapture:
        recaptured = time.perf_counter()
        batches = [torch_batch(examples, rows, config.keep, device) for _, rows in plan.groups]
        batches = [(tokens, keep) for tokens, _, keep in batches]
        capture = capture_with(model, batches, retrieval)
        detach_all = lambda: detach(model)  # noqa: E731
        memory = recapture_passes(
            memory, config.recapture, len(batches), capture, detach_all, progress
        )
        chosen["recapture_seconds"] = round(time.perf_counter() - recaptured, 3)
    record_build(memory, config, dataset, plan, retrieval, started, framework=framework, **chosen)
    if out is not None:
        memory.save(out, force=force)
    return memory
