"""Building a kNN-MoE memory from a local dataset: ``build_memory``.

Stages: load the dataset -> plan the batches (plan.py; a held-out slice for eta auto) ->
the gradient pass over every batch (gradient.py), each saved to ``<out>.partial/`` so an
interrupted build resumes (checkpoint.py), shared between ranks under ``mlx.launch``
(distributed.py) -> choose eta on the held-out slice through retrieval (eta_choice.py) ->
assemble the memory, record the build, add a router probe, append, save.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from ..config import BuildConfig, KNNConfig
from ..data.batches import make_batch
from ..data.examples import Dataset, load_dataset
from ..memory.bandwidth import calibrate_bandwidth
from ..memory.file_format import MemoryMismatchError, fingerprint_differences
from ..memory.fingerprint import fingerprint
from ..memory.merging import merge_memories
from ..memory.probe import record_probe
from ..memory.store import Memory
from ..retrieval.attach import attached, installed
from .checkpoint import BuildCheckpoint
from .distributed import agree_all_ok, gather_rows, maybe_inject_fault, shard, world
from .eta_choice import choose_eta
from .gradient import optimise_batch
from .gradient_context import auto_surrogate
from .plan import BatchPlan, build_record, plan_batches, resolve_surrogate, stored_logits
from .refine import refine


def build_memory(
    model: nn.Module,
    tokenizer,
    data: str | Path | Dataset,
    config: BuildConfig | None = None,
    *,
    retrieval: KNNConfig | None = None,
    out: str | Path | None = None,
    force: bool = False,
    restart: bool = False,
    progress: bool = True,
    append_to: str | Path | None = None,
    **settings,
) -> Memory | None:
    """Build (and with ``out`` save) a memory; see the module docstring for the stages.

    ``config``: the build settings (``BuildConfig``); keyword ``settings`` change single
    fields (``eta=1.0``). ``retrieval``: the retrieval used to score eta on the held-out
    slice, recorded as the memory's default. ``append_to``: an existing memory of the same
    model; its recorded build settings are the defaults, the new entries go after its own and
    the result goes to ``out`` (default: the same file).

    Under ``mlx.launch`` the batches are shared between the ranks; rank 0 returns the memory
    (equal to a single-process build) and writes it, the other ranks return None. The model
    is left as it was found.
    """
    started = time.perf_counter()
    existing = _appendable(Path(append_to), fingerprint(model)) if append_to else None
    config = replace(_base_config(config, existing), **settings)
    if existing is not None:
        out = out if out is not None else append_to
        force = force or Path(out).resolve() == Path(append_to).resolve()
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    if attached(model):
        raise ValueError("the model has a memory attached; detach it before building")
    retrieval = retrieval or KNNConfig()
    dataset = data if isinstance(data, Dataset) else _load(data, tokenizer, config)
    surrogate = resolve_surrogate(config.surrogate, lambda: auto_surrogate(model))
    plan = plan_batches([len(e.tokens) for e in dataset.examples], config)
    fp = fingerprint(model)
    ckpt = None
    if out is not None:
        settings = _checkpoint_settings(fp, dataset, config, plan, surrogate)
        ckpt = BuildCheckpoint(f"{out}.partial", settings, restart)
    with installed(model):
        try:
            results = _run_batches(model, dataset, plan, config, surrogate, ckpt, progress)
        except BaseException:
            if ckpt is not None and ckpt.created and ckpt.completed() == 0:
                ckpt.remove()  # nothing to resume: leave no partial directory behind
            raise
        group = world()
        if group is not None and group.rank() != 0:
            return None  # rank 0 has every rank's entries: it tunes eta and writes the file
        values = _Values(results, config, plan)
        tuning = None
        eta = config.eta
        if config.auto_eta:
            tuning = _tune_eta(model, dataset, plan, values, fp, config, retrieval)
            eta = tuning["eta"]
        memory, extra = refine(
            model, tokenizer, _Parts(dataset, plan, values, config), eta, fp, retrieval, progress
        )
        eta = extra.pop("eta", eta)
    memory.build = build_record(
        config,
        dataset,
        eta=eta,
        tuning=tuning,
        surrogate=surrogate,
        entries=memory.num_entries()[memory.layers[0]],
        loss_before=sum(meta["loss"] for _, _, meta in results),
        seconds=time.perf_counter() - started,
        heldout_examples=plan.heldout,
        **extra,
    )
    memory.retrieval = retrieval.record()
    record_probe(memory, model)  # lets a quantised model say how far its routers moved
    if existing is not None:
        memory = merge_memories([existing, memory], [str(append_to), dataset.name])
    if out is not None:
        memory.save(out, force=force)
        ckpt.remove()
    return memory


def _base_config(config: BuildConfig | None, existing: Memory | None) -> BuildConfig:
    """``config``, or for an append the settings the memory was built with (its eta)."""
    if config is not None or existing is None:
        return config or BuildConfig()
    recorded = existing.build.get("config") or (existing.build.get("parts") or [{}])[-1].get(
        "config"
    )
    if recorded:
        return BuildConfig.from_record(recorded)
    eta = existing.build.get("eta")  # a memory written before build settings were recorded
    if eta is None:
        raise ValueError(f"{existing.path} records no single eta; pass one (--eta)")
    return BuildConfig(eta=eta)


def _load(path, tokenizer, config: BuildConfig) -> Dataset:
    if config.pseudo_labels:
        raise ValueError(
            "pseudo_labels: generate the answers first (build.pseudo_labels."
            "pseudo_label_dataset) and pass its Dataset as the data"
        )
    return load_dataset(
        path,
        tokenizer,
        config.format,
        max_examples=config.max_examples,
        max_seq_len=config.max_seq_len,
        seed=config.seed,
    )


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


def _checkpoint_settings(fp, dataset, config: BuildConfig, plan: BatchPlan, surrogate) -> dict:
    """What the saved batches depend on: resuming with anything else is refused."""
    return {
        "fingerprint": fp,
        "dataset_sha256": dataset.sha256,
        "format": dataset.format,
        "examples": len(dataset.examples),
        "max_seq_len": config.max_seq_len,
        "seed": config.seed,
        "steps": config.steps,
        "scope": config.scope,
        "surrogate": surrogate,
        "keep": config.keep,
        "batch_tokens": config.batch_tokens,
        "heldout_examples": plan.heldout,
        "etas": plan.etas,
    }


class _Values:
    """The gradient pass's results, concatenated per layer for a part of the plan
    (0: reference examples, 1: held out, None: all)."""

    def __init__(self, results: list, config: BuildConfig, plan: BatchPlan):
        self.results, self.steps, self.etas = results, config.steps, plan.etas

    def _concat(self, part: int | None, prefix: str) -> dict[int, mx.array]:
        chosen = [a for p, a, _ in self.results if part is None or p == part]
        layers = sorted(int(k.split(".")[1]) for k in chosen[0] if k.startswith(prefix + "."))
        return {i: mx.concatenate([a[f"{prefix}.{i}"] for a in chosen]) for i in layers}

    def keys(self, part: int | None) -> dict[int, mx.array]:
        return self._concat(part, "keys")

    def logits(self, part: int | None, eta: float) -> dict[int, mx.array]:
        z = self._concat(part, "z")
        computed = [self._concat(part, f"r{j}") for j in range(len(self.etas))]
        return {
            i: stored_logits(z[i], [c[i] for c in computed], eta, self.steps, self.etas) for i in z
        }


def _tune_eta(model, dataset, plan, values: _Values, fp, config, retrieval) -> dict:
    """eta auto: each grid point's memory is built without the held-out examples and scored
    on them through retrieval; the search index is built once for all of them."""
    keys = values.keys(0)
    bandwidth = {layer: calibrate_bandwidth(Memory.to_numpy(k)) for layer, k in keys.items()}
    heldout = [make_batch(dataset.examples, rows, config.keep) for p, rows in plan.groups if p]
    return choose_eta(
        model,
        heldout,
        lambda eta: Memory(keys, values.logits(0, eta), fp, bandwidth),
        config.eta_grid,
        retrieval,
        config.eta_patience,
    )


class _Parts:
    """The build's examples, batches and gradient-pass values by part (see ``_Values``), as
    build/refine.py reads them."""

    def __init__(self, dataset, plan: BatchPlan, values: _Values, config: BuildConfig):
        self.dataset, self.plan, self.values, self.config = dataset, plan, values, config

    def batches(self, part: int | None) -> list:
        groups = [rows for p, rows in self.plan.groups if part is None or p == part]
        return [make_batch(self.dataset.examples, rows, self.config.keep) for rows in groups]

    def memory(self, part: int | None, eta: float, fp: dict) -> Memory:
        return Memory(self.values.keys(part), self.values.logits(part, eta), fp)


def _run_batches(model, dataset, plan: BatchPlan, config, surrogate, ckpt, progress):
    """Every batch's arrays and meta, in global batch order; under mlx.launch each rank
    computes its share and the shares are exchanged."""
    examples, groups = dataset.examples, plan.groups
    group = world()
    mine = shard(len(groups), group)
    total = sum(len(examples[i].tokens) for b in mine for i in groups[b][1])
    show = progress and (group is None or group.rank() == 0)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="build", disable=not show)
    done, error = {}, None
    try:
        maybe_inject_fault(group)
        for index in mine:
            batch = make_batch(examples, groups[index][1], config.keep)
            saved = ckpt.load(index) if ckpt is not None else None
            if saved is not None:
                done[index] = saved
            else:
                done[index] = _one_batch(model, batch, plan.etas, config, surrogate)
                if ckpt is not None:
                    ckpt.save(index, *done[index])
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


def _one_batch(model, batch, etas, config: BuildConfig, surrogate):
    res = optimise_batch(
        model,
        batch.tokens,
        batch.loss_mask,
        batch.keep_mask,
        etas,
        config.steps,
        config.scope,
        surrogate,
    )
    arrays = {f"keys.{layer}": v for layer, v in res.keys.items()}
    arrays.update({f"z.{layer}": v for layer, v in res.router_logits.items()})
    for j, eta in enumerate(etas):
        arrays.update({f"r{j}.{layer}": v for layer, v in res.logits[eta].items()})
    mx.eval(arrays)
    return arrays, {"loss": res.loss_before, "targets": res.targets}


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
