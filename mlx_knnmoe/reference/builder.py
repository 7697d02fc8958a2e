"""``build_memory`` in torch: the same examples, batches, stored positions, eta handling and
file as ``mlx_knnmoe.build_memory`` (without resumable, distributed or appending builds).

Examples come from ``mlx_knnmoe.data`` and are grouped and padded by ``mlx_knnmoe.batches``
exactly as the MLX builder does, so both store the same positions in the same order.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..batches import length_groups, make_batch
from ..build import resolve_surrogate
from ..builder import heldout_count
from ..config import KNNConfig
from ..data import Dataset, load_dataset
from ..tuning import DEFAULT_ETA_GRID
from .build import SCOPES, auto_surrogate, optimise_batch
from .memory_io import Memory, calibrate_bandwidth, fingerprint
from .router import routers
from .tuning import choose_eta


def torch_batch(examples, rows: list[int], keep: str, device) -> tuple[torch.Tensor, ...]:
    """(tokens, loss mask, keep mask) [B, L] of ``mlx_knnmoe.batches.make_batch``."""
    batch = make_batch(examples, rows, keep)
    tokens = torch.from_numpy(np.array(batch.tokens)).long()
    masks = (torch.from_numpy(np.array(m)).float() for m in (batch.loss_mask, batch.keep_mask))
    return tokens.to(device), *(m.to(device) for m in masks)


def _on_cpu(res):
    """Finished batches wait on the host, so a long build does not fill the GPU."""
    res.keys = {k: v.cpu() for k, v in res.keys.items()}
    res.router_logits = {k: v.cpu() for k, v in res.router_logits.items()}
    res.logits = {e: {k: v.cpu() for k, v in d.items()} for e, d in res.logits.items()}
    return res


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_memory(
    model: nn.Module,
    tokenizer,
    data: str | Path | Dataset,
    *,
    format: str = "auto",
    out: str | Path | None = None,
    eta: float | str = "auto",
    eta_grid: tuple[float, ...] = DEFAULT_ETA_GRID,
    eta_patience: int | None = 2,
    steps: int = 1,
    scope: str = "sequence",
    surrogate: int | str | None = "auto",
    keep: str = "all",
    max_examples: int | None = None,
    max_seq_len: int = 1024,
    seed: int = 0,
    batch_tokens: int = 4096,
    heldout: float = 0.1,
    max_heldout: int = 200,
    config: KNNConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Memory:
    """Build (and with ``out`` save) a memory for a transformers model on its own device."""
    started = time.perf_counter()
    surrogate = resolve_surrogate(model, surrogate, auto_surrogate)
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if any(r.memory is not None for r in routers(model).values()):
        raise ValueError("the model has a memory attached; detach it before building")
    auto = eta == "auto"
    eta = eta if auto else float(eta)
    config = config or KNNConfig()
    dataset = (
        data
        if isinstance(data, Dataset)
        else load_dataset(
            data, tokenizer, format, max_examples=max_examples, max_seq_len=max_seq_len, seed=seed
        )
    )
    examples = dataset.examples
    n_held = heldout_count(len(examples), heldout, max_heldout) if auto else 0
    cut = len(examples) - n_held
    groups = []  # (part, example indices): reference batches first, then held-out ones
    for part, idx in enumerate([list(range(cut)), list(range(cut, len(examples)))]):
        lengths = [len(examples[i].tokens) for i in idx]
        groups += [(part, [idx[j] for j in g]) for g in length_groups(lengths, batch_tokens)]
    computed = [1.0] if steps == 1 else (list(eta_grid) if auto else [eta])
    device = _device(model)
    results, loss = [], 0.0
    total = sum(len(examples[i].tokens) for _, rows in groups for i in rows)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="build", disable=not progress) as bar:
        for part, rows in groups:
            tokens, loss_mask, keep_mask = torch_batch(examples, rows, keep, device)
            res = optimise_batch(
                model, tokens, loss_mask, keep_mask, computed, steps, scope, surrogate
            )
            results.append((part, _on_cpu(res)))
            loss += res.loss_before
            bar.update(sum(len(examples[i].tokens) for i in rows))

    def cat(part: int | None, pick) -> dict[int, torch.Tensor]:
        chosen = [pick(r) for p, r in results if part is None or p == part]
        return {layer: torch.cat([c[layer] for c in chosen]) for layer in chosen[0]}

    def logits_of(part: int, eta: float) -> dict[int, torch.Tensor]:
        z = cat(part, lambda r: r.router_logits)
        if steps == 1:  # the step is linear in eta: stored at eta = 1, scaled here
            r1 = cat(part, lambda r: r.logits[1.0])
            return {layer: z[layer] + eta * (r1[layer] - z[layer]) for layer in z}
        return cat(part, lambda r: r.logits[eta])

    fp = fingerprint(model)
    tuning = None
    if auto:
        keys = cat(0, lambda r: r.keys)
        bandwidth = {layer: calibrate_bandwidth(k) for layer, k in keys.items()}
        heldout_batches = [
            torch_batch(examples, rows, keep, device)[:2] for p, rows in groups if p == 1
        ]
        tuning = choose_eta(
            model,
            heldout_batches,
            lambda e: Memory(keys, logits_of(0, e), fp, bandwidth),
            tuple(eta_grid),
            config,
            eta_patience,
        )
        tuning["heldout_examples"] = n_held
        eta = tuning["eta"]
    keys = cat(None, lambda r: r.keys)
    parts = [logits_of(p, eta) for p in (0, 1) if any(q == p for q, _ in results)]
    logits = {layer: torch.cat([p[layer] for p in parts]) for layer in keys}
    memory = Memory(keys, logits, fp)
    tokens = sum(len(e.tokens) for e in examples)
    memory.build = {
        "eta": eta,
        "eta_auto": tuning,
        "steps": steps,
        "scope": scope,
        "dense_surrogate": surrogate,
        "keep": keep,
        "seed": seed,
        "max_seq_len": max_seq_len,
        "datasets": [
            {
                "name": dataset.name,
                "sha256": dataset.sha256,
                "format": dataset.format,
                "examples": len(examples),
                "tokens": tokens,
                "targets": dataset.num_targets(),
            }
        ],
        "examples": len(examples),
        "tokens": tokens,
        "entries": memory.num_entries()[memory.layers[0]],
        "nll_before": loss / max(dataset.num_targets(), 1),
        "seconds": round(time.perf_counter() - started, 3),
        "mlx_knnmoe": __version__,
        "framework": f"torch {torch.__version__} on {device.type}",
    }
    memory.retrieval = {k: v for k, v in asdict(config).items() if v is not None}
    if out is not None:
        memory.save(out, force=force)
    return memory
