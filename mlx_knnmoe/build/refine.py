"""After eta is chosen: re-capture the keys with the memory attached (recapture.py) and, with
``calibrate``, choose eta and each layer's bandwidth on the held-out slice under a guard
(calibrate.py). Returns the final memory and what the build record says about it."""

from __future__ import annotations

import time
from typing import Protocol

import mlx.nn as nn

from ..config import KNNConfig
from ..data.batches import make_batch
from ..memory.store import Memory
from .calibrate import calibrate
from .calibrate_rule import eta_candidates, guard_rows, no_gain, no_gain_message, scaled
from .calibrate_rule import guard_examples as shared_guard_examples
from .guard import sample_guard
from .recapture import recapture_keys


class Parts(Protocol):
    """The build's batches and memories by part: 0 reference, 1 held out, None all."""

    config: object

    def batches(self, part: int | None) -> list: ...

    def memory(self, part: int | None, eta: float | dict[int, float], fp: dict) -> Memory: ...


def refine(
    model: nn.Module,
    tokenizer,
    parts: Parts,
    eta: float,
    fp: dict,
    retrieval: KNNConfig,
    progress: bool,
) -> tuple[Memory, dict]:
    config = parts.config
    record: dict = {}
    scales = None
    step = eta  # one step size, or one per layer (calibrate with layer_eta)
    if config.calibrate and config.auto_eta:
        started = time.perf_counter()
        result = _calibrate(model, tokenizer, parts, eta, fp, retrieval, progress)
        if no_gain(result):  # nothing to keep: say so before the final memory is built
            raise ValueError(no_gain_message(result))
        eta, scales = result["eta"], result["scales"]
        step = result["layer_eta"] or eta
        record["calibration"] = {**result, "seconds": round(time.perf_counter() - started, 3)}
        record["eta"] = eta
    memory = parts.memory(None, step, fp)
    if config.recapture:
        started = time.perf_counter()
        memory = recapture_keys(
            model, parts.batches(None), memory, config.recapture, retrieval, progress
        )
        record["recapture_seconds"] = round(time.perf_counter() - started, 3)
    if scales is not None:
        memory = scaled(memory, scales)
    return memory, record


def guard_examples(model: nn.Module, tokenizer, config) -> list:
    """The guard set: the ``guard`` file's examples, or text sampled from the model."""
    return shared_guard_examples(tokenizer, config, lambda *a: sample_guard(model, *a))


def _calibrate(model, tokenizer, parts: Parts, eta, fp, retrieval, progress) -> dict:
    config = parts.config
    reference = parts.memory(0, eta, fp)
    if config.recapture:
        batches = parts.batches(0)
        reference = recapture_keys(model, batches, reference, config.recapture, retrieval, progress)
    keys, bandwidth = reference.keys, reference.bandwidth
    guard = guard_examples(model, tokenizer, config)
    guard_batches = [make_batch(guard, rows) for rows in guard_rows(len(guard))]

    def memory_for(e: float | dict[int, float], scales: dict[int, float]) -> Memory | None:
        m = Memory(keys, parts.memory(0, e, fp).logits, fp, dict(bandwidth))
        return scaled(m, scales)

    return calibrate(
        model,
        parts.batches(1),
        guard_batches,
        memory_for,
        eta,
        sorted(keys),
        retrieval,
        eta_candidates(config),
        config.layer_eta,
    )
