"""``build_memory`` in torch: the same examples, batches, stored positions, eta handling,
calibration, re-capture and file as ``mlx_knnmoe.build_memory`` (build/pipeline.py; without
resumable, distributed or appending builds). The plan, the stored logits and the build record
come from the shared ``mlx_knnmoe.build.plan``, the calibration rule from
``mlx_knnmoe.build.calibrate_rule``, so both sides store the same positions in the same order
and, with a guard file, choose the same settings.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..build.plan import plan_batches, resolve_surrogate, scan_eta_grid
from ..build.stages import output_path, read_dataset, record_build
from ..config import BuildConfig, KNNConfig
from ..data.examples import Dataset
from ..memory.bandwidth import calibrate_bandwidth
from .eta_choice import heldout_nll
from .gradient import auto_surrogate, optimise_batch
from .parts import Parts, torch_batch
from .refine import refine
from .router import attached
from .store import Memory, fingerprint


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
    Arguments as ``mlx_knnmoe.build_memory``: the same eta choice, calibration (with eta
    auto; raises ValueError when it switches every layer off) and re-captured keys."""
    started = time.perf_counter()
    config = replace(config or BuildConfig(), **settings)
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
    parts = Parts(examples, plan, results, config, device)
    fp = fingerprint(model)
    tuning, eta = None, config.eta
    if config.auto_eta:
        keys = parts.keys(0)
        bandwidth = {i: calibrate_bandwidth(Memory.to_numpy(k)) for i, k in keys.items()}
        heldout = [b[:2] for b in parts.batches(1)]

        def score(eta: float) -> float:
            memory = Memory(keys, parts.logits(0, eta), fp, bandwidth)
            return heldout_nll(model, heldout, memory, retrieval)

        plain = heldout_nll(model, heldout, None, retrieval)
        tuning = scan_eta_grid(score, plain, config.eta_grid, config.eta_patience)
        eta = tuning["eta"]
    memory, extra = refine(model, tokenizer, parts, eta, fp, retrieval, progress)
    eta = extra.pop("eta", eta)
    framework = f"torch {torch.__version__} on {device.type}"
    chosen = dict(eta=eta, tuning=tuning, surrogate=surrogate, loss_before=loss, **extra)
    record_build(memory, config, dataset, plan, retrieval, started, framework=framework, **chosen)
    if out is not None:
        memory.save(out, force=force)
    return memory
