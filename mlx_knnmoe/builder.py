"""Building a kNN-MoE memory from a local dataset: ``build_memory`` (the CLI is build_memory.py).

Pipeline: dataset -> examples (data.py) -> length-grouped batches -> one gradient pass per
batch (build.py), each batch saved to ``<out>.partial/`` so an interrupted build resumes ->
with ``eta="auto"`` the step size is chosen by the NLL of a held-out slice of the reference
set through retrieval from a memory built without it (tuning.py) -> one memory file.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from . import __version__
from .batches import length_groups, make_batch
from .build import SCOPES, optimise_batch, resolve_surrogate
from .checkpoint import BuildCheckpoint
from .config import KNNConfig
from .data import Dataset, load_dataset
from .distributed import agree_all_ok, gather_rows, maybe_inject_fault, shard, world
from .memory import Memory, MemoryMismatchError, calibrate_bandwidth, fingerprint
from .merge import fingerprint_differences, merge_memories
from .probe import record_probe
from .router import _routers
from .tuning import DEFAULT_ETA_GRID, choose_eta


def heldout_count(n: int, fraction: float, cap: int) -> int:
    if n < 2:
        raise ValueError(
            f"eta auto needs at least 2 examples (one is held out to choose eta); the dataset "
            f"has {n}. Pass a fixed eta (--eta 1.0) instead"
        )
    return min(n - 1, cap, max(1, round(fraction * n)))


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
    restart: bool = False,
    progress: bool = True,
    append_to: str | Path | None = None,
) -> Memory | None:
    """Build (and with ``out`` save) a memory; see the module docstring for the steps.

    Under ``mlx.launch`` the batches are shared between the ranks; rank 0 returns the memory
    (equal to a single-process build) and writes it, the other ranks return None.

    ``config`` is the retrieval used to score eta on the held-out slice; it is recorded in
    the memory as its default retrieval settings. ``append_to``: an existing memory of the
    same model; the new entries are added after its own (``eta="same"`` reuses its eta) and
    the result goes to ``out``, by default the same file. ``surrogate``: k' for the gradient
    pass, ``"auto"`` (``build.auto_surrogate``: 4k where the router gives unselected experts
    no gradient) or None/0/"off".
    """
    started = time.perf_counter()
    surrogate = resolve_surrogate(model, surrogate)
    existing = None
    if append_to is not None:
        existing = _appendable(Path(append_to), fingerprint(model))
        out = out if out is not None else append_to
        force = force or Path(out).resolve() == Path(append_to).resolve()
        if eta == "same":
            eta = existing.build.get("eta")
            if eta is None:
                raise ValueError(f"{append_to} records no single eta; pass one (--eta)")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if any(r._memory is not None for r in _routers(model).values()):
        raise ValueError("the model has a memory attached; detach it before building")
    auto = eta == "auto"
    if not auto:
        eta = float(eta)
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
    parts = [list(range(cut)), list(range(cut, len(examples)))]
    groups = []  # (part, example indices): reference batches first, then held-out ones
    for part, idx in enumerate(parts):
        lengths = [len(examples[i].tokens) for i in idx]
        groups += [(part, [idx[j] for j in g]) for g in length_groups(lengths, batch_tokens)]
    # with S = 1 the step is linear in eta: store eta = 1 and scale later
    computed = [1.0] if steps == 1 else (list(eta_grid) if auto else [eta])
    fp = fingerprint(model)
    settings = {
        "fingerprint": fp,
        "dataset_sha256": dataset.sha256,
        "format": dataset.format,
        "examples": len(examples),
        "max_seq_len": max_seq_len,
        "seed": seed,
        "steps": steps,
        "scope": scope,
        "surrogate": surrogate,
        "keep": keep,
        "batch_tokens": batch_tokens,
        "heldout_examples": n_held,
        "etas": computed,
    }
    ckpt = BuildCheckpoint(f"{out}.partial", settings, restart) if out else None
    results = _run_batches(
        model, examples, groups, keep, computed, steps, scope, surrogate, ckpt, progress
    )
    group = world()
    if group is not None and group.rank() != 0:
        return None  # rank 0 has every rank's entries: it tunes eta and writes the file

    def logits_of(part: int, eta: float) -> dict[int, mx.array]:
        chosen = [a for p, a, _ in results if p == part]
        z = _concat(chosen, "z")
        if steps == 1:
            r1 = _concat(chosen, "r0")
            return {layer: z[layer] + eta * (r1[layer] - z[layer]) for layer in z}
        return _concat(chosen, f"r{computed.index(eta)}")

    tuning = None
    if auto:
        keys = _concat([a for p, a, _ in results if p == 0], "keys")
        bandwidth = {layer: calibrate_bandwidth(k) for layer, k in keys.items()}
        heldout_batches = [make_batch(examples, rows, keep) for p, rows in groups if p == 1]
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
    keys = _concat([a for _, a, _ in results], "keys")
    logits = {layer: [] for layer in keys}
    for part in (0, 1):
        if any(p == part for p, _, _ in results):
            for layer, v in logits_of(part, eta).items():
                logits[layer].append(v)
    memory = Memory(keys, {layer: mx.concatenate(v) for layer, v in logits.items()}, fp)
    tokens = sum(len(e.tokens) for e in examples)
    seconds = time.perf_counter() - started
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
        "nll_before": sum(m["loss"] for _, _, m in results) / max(dataset.num_targets(), 1),
        "seconds": round(seconds, 3),
        "mlx_knnmoe": __version__,
    }
    memory.retrieval = {k: v for k, v in asdict(config).items() if v is not None}
    record_probe(memory, model)  # lets a quantised model say how far its routers moved
    if existing is not None:
        memory = merge_memories([existing, memory], [str(append_to), dataset.name])
    if out is not None:
        memory.save(out, force=force)
        ckpt.remove()
    return memory


def _appendable(path: Path, model_fingerprint: dict) -> Memory:
    existing = Memory.load(path)
    differ = fingerprint_differences(
        existing.fingerprint, model_fingerprint, str(path), "the model"
    )
    if differ:
        raise MemoryMismatchError(
            f"cannot append to {path}: it was built for another model ({'; '.join(differ)})"
        )
    return existing


def _concat(arrays: list[dict], prefix: str) -> dict[int, mx.array]:
    layers = sorted(int(k.split(".")[1]) for k in arrays[0] if k.startswith(prefix + "."))
    return {layer: mx.concatenate([a[f"{prefix}.{layer}"] for a in arrays]) for layer in layers}


def _run_batches(model, examples, groups, keep, etas, steps, scope, surrogate, ckpt, progress):
    """Every batch's arrays and meta, in global batch order; under mlx.launch each rank
    computes its share and the shares are exchanged."""
    group = world()
    mine = shard(len(groups), group)
    total = sum(len(examples[i].tokens) for b in mine for i in groups[b][1])
    show = progress and (group is None or group.rank() == 0)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="build", disable=not show)
    done, error = {}, None
    try:
        maybe_inject_fault(group)
        for index in mine:
            batch = make_batch(examples, groups[index][1], keep)
            done[index] = _one_batch(model, batch, index, etas, steps, scope, surrogate, ckpt)
            bar.update(batch.num_tokens)
            meta = done[index][1]
            bar.set_postfix(nll=f"{meta['loss'] / max(meta['targets'], 1):.3f}")
    except Exception as e:  # shared with the other ranks before anyone waits on a gather
        error = e
    finally:
        bar.close()
    if group is None:
        if error is not None:
            raise error
    else:
        agree_all_ok(group, error)
        done = _exchange(done, len(groups), group)
    return [(groups[i][0], *done[i]) for i in range(len(groups))]


def _one_batch(model, batch, index, etas, steps, scope, surrogate, ckpt):
    if ckpt is not None and ckpt.done(index):
        return ckpt.load(index)
    res = optimise_batch(
        model, batch.tokens, batch.loss_mask, batch.keep_mask, etas, steps, scope, surrogate
    )
    arrays = {f"keys.{layer}": v for layer, v in res.keys.items()}
    arrays.update({f"z.{layer}": v for layer, v in res.router_logits.items()})
    for j, eta in enumerate(etas):
        arrays.update({f"r{j}.{layer}": v for layer, v in res.logits[eta].items()})
    mx.eval(arrays)
    meta = {"loss": res.loss_before, "targets": res.targets}
    if ckpt is not None:
        ckpt.save(index, arrays, meta)
    return arrays, meta


def _exchange(done: dict, n_batches: int, group) -> dict:
    """All ranks' batches on every rank: rows are gathered, then split back per batch."""
    mine = sorted(done)
    rows = [next(iter(done[i][0].values())).shape[0] for i in mine]
    entries = {k: mx.concatenate([done[i][0][k] for i in mine]) for k in done[mine[0]][0]}
    meta = {
        "rows": mx.array(rows, dtype=mx.int32),
        "loss": mx.array([done[i][1]["loss"] for i in mine], dtype=mx.float32),
        "targets": mx.array([done[i][1]["targets"] for i in mine], dtype=mx.int32),
    }
    all_entries, all_meta = gather_rows(entries, group), gather_rows(meta, group)
    out = {}
    for rank, (ent, met) in enumerate(zip(all_entries, all_meta)):
        start = 0
        for j, index in enumerate(shard(n_batches, group, rank)):
            n = int(met["rows"][j].item())
            arrays = {k: v[start : start + n] for k, v in ent.items()}
            out[index] = (
                arrays,
                {"loss": float(met["loss"][j]), "targets": int(met["targets"][j])},
            )
            start += n
    return out
