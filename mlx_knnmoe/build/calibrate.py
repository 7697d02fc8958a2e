"""Calibrated confidence: eta and each layer's bandwidth chosen on held-out reference data,
guarded by the original domain (docs/METHOD.md, "Calibrated confidence").

The RBF bandwidth of a layer sets how far from a key the memory is still trusted; the
median-nearest-neighbour rule (memory/bandwidth.py) knows nothing about whether trusting it
helps. Here each layer's bandwidth is multiplied by a scale (0 switches the layer's memory
off), chosen with eta by the held-out NLL, but only among settings that do not raise the
guard set's NLL beyond noise: the mean increase per target token must stay within two
standard errors of the paired per-sequence differences to the plain model. With
``layer_eta`` each layer that kept its memory then tries its own eta (the neighbouring eta
candidates of the chosen one) under the same rule.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.nn as nn
import numpy as np

from ..config import KNNConfig
from ..data.batches import Batch
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .gradient import row_nll

ETA_FACTORS = (1 / 3, 1.0, 3.0)
SCALES = (0.0, 0.5, 1.0, 2.0)


def batch_rows_nll(model: nn.Module, batches: list[Batch]) -> tuple[np.ndarray, float]:
    """Summed target NLL per sequence (in batch order) and the number of targets."""
    rows = [np.array(row_nll(model, b.tokens, b.loss_mask)) for b in batches]
    return np.concatenate(rows), float(sum(b.loss_mask[:, 1:].sum() for b in batches))


def guard_ok(plain: np.ndarray, other: np.ndarray, targets: float) -> tuple[float, bool]:
    """Mean NLL change per guard token and whether it is within noise (<= 2 standard errors
    of the paired per-sequence differences)."""
    d = other - plain
    change = float(d.sum() / targets)
    noise = 2.0 * float(np.sqrt(len(d)) * d.std(ddof=1) / targets) if len(d) > 1 else 0.0
    return change, change <= noise + 1e-7


def calibrate(
    model: nn.Module,
    heldout: list[Batch],
    guard: list[Batch],
    memory_for: Callable[[float | dict[int, float], dict[int, float]], Memory | None],
    eta: float,
    layers: list[int],
    config: KNNConfig,
    around: Callable[[float], list[float]] | None = None,
    layer_eta: bool = False,
) -> dict:
    """Scan eta (``around(eta)``, default ``ETA_FACTORS`` times ``eta``, all scales 1), then
    each layer's bandwidth scale in turn (``SCALES``), then (``layer_eta``) each kept layer's
    own eta among ``around(chosen eta)``; keep a change when it lowers the held-out NLL and
    the guard stays within noise. Starts from the plain model (every scale 0) so a memory that
    helps nowhere within the guard comes back with every scale 0. ``memory_for(eta, scales)``:
    the memory without the held-out examples (None when every layer is off); ``eta`` one step
    size or one per layer. Leaves the model without a memory."""
    around = around or (lambda e: [e * f for f in ETA_FACTORS])
    detach(model)
    h_rows, h_targets = batch_rows_nll(model, heldout)
    g_plain, g_targets = batch_rows_nll(model, guard)
    trials = []

    def trial(eta: float | dict[int, float], scales: dict[int, float]) -> dict:
        memory = memory_for(eta, scales)
        if memory is None:
            detach(model)
        else:
            attach(model, memory, config, validate=False)
        h = float(batch_rows_nll(model, heldout)[0].sum() / h_targets)
        change, ok = guard_ok(g_plain, batch_rows_nll(model, guard)[0], g_targets)
        t = {"eta": eta, "scales": dict(scales), "heldout_nll": h, "guard_change": change}
        trials.append({**t, "guard_ok": ok})
        return trials[-1]

    try:
        plain = {"eta": eta, "scales": dict.fromkeys(layers, 0.0)}
        best = {**plain, "heldout_nll": float(h_rows.sum() / h_targets), "guard_ok": True}
        ones = dict.fromkeys(layers, 1.0)
        for candidate in around(eta):
            t = trial(candidate, ones)
            if t["guard_ok"] and t["heldout_nll"] < best["heldout_nll"]:
                best = t
        chosen_eta, scales, best_h = best["eta"], dict(best["scales"]), best["heldout_nll"]
        for layer in layers:
            current = dict(scales)
            for s in SCALES:
                if s == current[layer]:
                    continue
                t = trial(chosen_eta, {**current, layer: s})
                if t["guard_ok"] and t["heldout_nll"] < best_h:
                    scales, best_h = t["scales"], t["heldout_nll"]
        etas = dict.fromkeys(layers, chosen_eta)
        for layer in [x for x in layers if scales[x] > 0] if layer_eta else ():
            current = dict(etas)
            for e in around(chosen_eta):
                if e == current[layer]:
                    continue
                t = trial({**current, layer: e}, scales)
                if t["guard_ok"] and t["heldout_nll"] < best_h:
                    etas, best_h = t["eta"], t["heldout_nll"]
    finally:
        detach(model)
    return {
        "eta": chosen_eta,
        "scales": scales,
        "layer_eta": etas if layer_eta else None,
        "heldout_nll": best_h,
        "plain_heldout_nll": float(h_rows.sum() / h_targets),
        "guard_sequences": len(g_plain),
        "trials": trials,
    }


def scaled(memory: Memory, scales: dict[int, float]) -> Memory | None:
    """``memory`` with each layer's bandwidth times its scale; layers at scale 0 dropped."""
    on = [layer for layer in memory.layers if scales.get(layer, 1.0) > 0]
    if not on:
        return None
    return Memory(
        {layer: memory.keys[layer] for layer in on},
        {layer: memory.logits[layer] for layer in on},
        memory.fingerprint,
        {layer: memory.bandwidth[layer] * scales.get(layer, 1.0) for layer in on},
    )
