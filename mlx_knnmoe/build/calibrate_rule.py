"""Calibrated confidence, the framework-free rule shared by the MLX builder (build/calibrate.py,
build/refine.py) and the PyTorch companion (pytorch/calibrate.py, pytorch/pipeline.py):
which settings are tried in which order, when one is kept, the guard set, and the memory
with each layer's bandwidth scaled (docs/METHOD.md, "Calibrated confidence").

The RBF bandwidth of a layer sets how far from a key the memory is still trusted; the
median-nearest-neighbour rule (memory/bandwidth.py) knows nothing about whether trusting it
helps. Here each layer's bandwidth is multiplied by a scale (0 switches the layer's memory
off), chosen with eta by the held-out NLL, but only among settings that do not raise the
guard set's NLL beyond noise: the mean increase per target token must stay within two
standard errors of the paired per-sequence differences to the plain model. With
``layer_eta`` each layer that kept its memory then tries its own eta (the neighbouring eta
candidates of the chosen one) under the same rule. The framework supplies ``score``: the
summed target NLL of each held-out and each guard sequence with a memory attached, and the
number of targets in each set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..data.examples import Example, load_dataset
from ..memory.file_format import MemoryData

ETA_FACTORS = (1 / 3, 1.0, 3.0)
SCALES = (0.0, 0.5, 1.0, 2.0)
GUARD_LENGTH = 48  # tokens per sampled guard sequence (BuildConfig.guard_samples: how many)
GUARD_BATCH = 16  # guard sequences per batch

Eta = float | dict[int, float]  # one step size, or one per layer
M = TypeVar("M", bound=MemoryData)
Rows = tuple[np.ndarray, float]  # summed target NLL per sequence, number of targets
# memory (None: the plain model) -> the held-out set's and the guard set's Rows
Score = Callable[[Any], tuple[Rows, Rows]]


def guard_ok(plain: np.ndarray, other: np.ndarray, targets: float) -> tuple[float, bool]:
    """Mean NLL change per guard token and whether it is within noise (<= 2 standard errors
    of the paired per-sequence differences)."""
    d = other - plain
    change = float(d.sum() / targets)
    noise = 2.0 * float(np.sqrt(len(d)) * d.std(ddof=1) / targets) if len(d) > 1 else 0.0
    return change, change <= noise + 1e-7


def choose_settings(
    score: Score,
    memory_for: Callable[[Eta, dict[int, float]], Any],
    eta: float,
    layers: list[int],
    around: Callable[[float], list[float]] | None = None,
    layer_eta: bool = False,
) -> dict:
    """Scan eta (``around(eta)``, default ``ETA_FACTORS`` times ``eta``, all scales 1), then
    each layer's bandwidth scale in turn (``SCALES``), then (``layer_eta``) each kept layer's
    own eta among ``around(chosen eta)``; keep a change when it lowers the held-out NLL and
    the guard stays within noise. Starts from the plain model (every scale 0) so a memory that
    helps nowhere within the guard comes back with every scale 0.

    ``score(memory)``: (summed target NLL per sequence, targets) of the held-out and of the
    guard set with ``memory`` attached (None: the plain model); ``memory_for(eta, scales)``: the
    memory without the held-out examples (None when every layer is off), ``eta`` one step
    size or one per layer. Returns the choice, the NLLs and every trial, as the build record
    keeps them."""
    around = around or (lambda e: [e * f for f in ETA_FACTORS])
    (h_rows, h_targets), (g_plain, g_targets) = score(None)
    plain_h = float(h_rows.sum() / h_targets)
    trials = []

    def trial(eta: Eta, scales: dict[int, float]) -> dict:
        (h_rows, _), (g_rows, _) = score(memory_for(eta, scales))
        change, ok = guard_ok(g_plain, g_rows, g_targets)
        h = float(h_rows.sum() / h_targets)
        trials.append({"eta": eta, "scales": dict(scales), "heldout_nll": h})
        trials[-1].update(guard_change=change, guard_ok=ok)
        return trials[-1]

    def better(t: dict, than: float) -> bool:
        return t["guard_ok"] and t["heldout_nll"] < than

    best = {"eta": eta, "scales": dict.fromkeys(layers, 0.0), "heldout_nll": plain_h}
    for candidate in around(eta):
        t = trial(candidate, dict.fromkeys(layers, 1.0))
        best = t if better(t, best["heldout_nll"]) else best
    chosen_eta, scales, best_h = best["eta"], dict(best["scales"]), best["heldout_nll"]
    for layer in layers:
        current = dict(scales)
        for s in (s for s in SCALES if s != current[layer]):
            t = trial(chosen_eta, {**current, layer: s})
            if better(t, best_h):
                scales, best_h = t["scales"], t["heldout_nll"]
    etas = dict.fromkeys(layers, chosen_eta)
    for layer in [x for x in layers if scales[x] > 0] if layer_eta else ():
        current = dict(etas)
        for e in (e for e in around(chosen_eta) if e != current[layer]):
            t = trial({**current, layer: e}, scales)
            if better(t, best_h):
                etas, best_h = t["eta"], t["heldout_nll"]
    return {
        "eta": chosen_eta,
        "scales": scales,
        "layer_eta": etas if layer_eta else None,
        "heldout_nll": best_h,
        "plain_heldout_nll": plain_h,
        "guard_sequences": len(g_plain),
        "trials": trials,
    }


def no_gain(result: dict) -> bool:
    """Whether calibration switched every layer off (no setting helped within the guard)."""
    return not any(s > 0 for s in result["scales"].values())


def no_gain_message(result: dict) -> str:
    """The error when calibration switched every layer off: the plain model's held-out NLL
    and the lowest a trial reached, whether the guard allowed it or not."""
    plain = result["plain_heldout_nll"]
    best = min((t["heldout_nll"] for t in result["trials"]), default=plain)
    return (
        "calibrate: no setting lowered the held-out NLL without raising the guard's NLL beyond "
        f"noise (plain {plain:.4f}, best {best:.4f}); the memory would not help: rerun with "
        "--no-calibrate to keep it anyway"
    )


def scaled(memory: M, scales: dict[int, float]) -> M | None:
    """``memory`` (either framework's ``Memory``) with each layer's bandwidth times its scale;
    layers at scale 0 dropped (None when none is left)."""
    on = [layer for layer in memory.layers if scales.get(layer, 1.0) > 0]
    if not on:
        return None
    return type(memory)(
        {layer: memory.keys[layer] for layer in on},
        {layer: memory.logits[layer] for layer in on},
        memory.fingerprint,
        {layer: memory.bandwidth[layer] * scales.get(layer, 1.0) for layer in on},
    )


def eta_candidates(config) -> Callable[[float], list[float]]:
    """The etas calibration tries around a chosen one: ``ETA_FACTORS`` times it with S = 1
    (the stored logits are linear in eta), else the eta grid's neighbours of it (with S > 1
    the gradient pass computed the grid's etas only)."""
    if config.steps == 1:
        return lambda eta: [eta * f for f in ETA_FACTORS]
    grid = sorted(config.eta_grid)

    def neighbours(eta: float) -> list[float]:
        i = grid.index(eta)
        return grid[max(i - 1, 0) : i + 2]

    return neighbours


def guard_examples(
    tokenizer, config, sample: Callable[[int, int, int, int], list[Example]]
) -> list[Example]:
    """The guard set: the ``guard`` file's examples, or ``sample(start token, guard_samples,
    GUARD_LENGTH, seed)`` (text sampled from the model; ``sampled_guard`` makes the examples),
    starting at the tokenizer's BOS token (else EOS, else 0)."""
    if config.guard is not None:
        return load_dataset(
            config.guard, tokenizer, "auto", max_seq_len=config.max_seq_len
        ).examples
    start = getattr(tokenizer, "bos_token_id", None)
    start = start if start is not None else getattr(tokenizer, "eos_token_id", None)
    start = start if start is not None else 0
    return sample(start, config.guard_samples, GUARD_LENGTH, config.seed)


def sampled_guard(rows: list[list[int]]) -> list[Example]:
    """Sampled token rows as guard examples: every token after the first is a target."""
    return [Example(row, [0] + [1] * (len(row) - 1), f"guard:{i}") for i, row in enumerate(rows)]


def guard_rows(count: int) -> list[list[int]]:
    """The guard examples' indices in batches of ``GUARD_BATCH``."""
    return [list(range(i, min(i + GUARD_BATCH, count))) for i in range(0, count, GUARD_BATCH)]
