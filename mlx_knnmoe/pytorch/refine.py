"""After eta is chosen, in torch (the MLX builder's build/refine.py): with ``calibrate``,
choose eta, each layer's bandwidth scale and each kept layer's eta on the held-out slice
under a guard (the shared ``build.calibrate_rule``, scored by pytorch/calibrate.py), on the
reference memory re-captured as the final one will be; then the final memory at the chosen
eta(s), its keys re-captured (pytorch/recapture.py) and its bandwidths scaled. Returns the
final memory and what the build record says about it."""

from __future__ import annotations

import time

from torch import nn

from ..build.calibrate_rule import (
    Eta,
    choose_settings,
    eta_candidates,
    guard_examples,
    guard_rows,
    no_gain,
    no_gain_message,
    scaled,
)
from ..build.stages import recapture_passes
from ..config import KNNConfig
from .calibrate import scoring
from .guard import sample_guard
from .parts import Parts, torch_batch
from .recapture import capture_with
from .router import detach
from .store import Memory


def refine(
    model: nn.Module, tokenizer, parts: Parts, eta: float, fp: dict, retrieval: KNNConfig, progress
) -> tuple[Memory, dict]:
    """The final memory at ``eta`` (or the calibrated settings) and the record's additions:
    ``calibration``, ``eta`` (the calibrated one) and ``recapture_seconds``. Raises
    ValueError when calibration switches every layer off."""
    config, record = parts.config, {}
    scales, step = None, eta
    if config.calibrate and config.auto_eta:
        started = time.perf_counter()
        result = _calibrate(model, tokenizer, parts, eta, fp, retrieval, progress)
        if no_gain(result):  # nothing to keep: say so before the final memory is built
            raise ValueError(no_gain_message(result))
        seconds = round(time.perf_counter() - started, 3)
        record.update(calibration={**result, "seconds": seconds}, eta=result["eta"])
        scales, step = result["scales"], result["layer_eta"] or result["eta"]
    memory = parts.memory(None, step, fp)
    if config.recapture:
        started = time.perf_counter()
        memory = _recaptured(model, parts, None, memory, retrieval, progress)
        record["recapture_seconds"] = round(time.perf_counter() - started, 3)
    return (memory if scales is None else scaled(memory, scales)), record


def _recaptured(model, parts: Parts, part: int | None, memory: Memory, retrieval, progress):
    """``memory`` (the entries of ``part``) with its keys re-captured ``recapture`` times."""
    batches = [(tokens, keep) for tokens, _, keep in parts.batches(part)]
    capture = capture_with(model, batches, retrieval)
    passes = parts.config.recapture
    return recapture_passes(memory, passes, len(batches), capture, lambda: detach(model), progress)


def _calibrate(model, tokenizer, parts: Parts, eta: float, fp, retrieval, progress) -> dict:
    """The calibration of the reference memory (re-captured when the build re-captures),
    scored on the held-out batches and the guard set."""
    config = parts.config
    reference = parts.memory(0, eta, fp)
    if config.recapture:
        reference = _recaptured(model, parts, 0, reference, retrieval, progress)
    keys, bandwidth = reference.keys, reference.bandwidth
    device = next(model.parameters()).device
    guard = guard_examples(tokenizer, config, lambda *a: sample_guard(model, *a))
    guard_batches = [torch_batch(guard, rows, "all", device)[:2] for rows in guard_rows(len(guard))]
    heldout = [b[:2] for b in parts.batches(1)]

    def memory_for(e: Eta, scales: dict[int, float]) -> Memory | None:
        return scaled(Memory(keys, parts.logits(0, e), fp, dict(bandwidth)), scales)

    with scoring(model, heldout, guard_batches, retrieval) as score:
        around = eta_candidates(config)
        return choose_settings(score, memory_for, eta, sorted(keys), around, config.layer_eta)
