"""The framework-free part of a build, shared by the MLX builder and the PyTorch companion:
which examples are held out and how they are batched, the dense-surrogate rule, the eta scan,
how the stored logits follow from the gradient pass, and the build record in the file."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import BuildConfig
from ..data.batches import length_groups
from ..version import __version__


@contextmanager
def overridden(changes: Iterable[tuple[object, str, object]]) -> Iterator[None]:
    """Set each (object, attribute, value) for the duration of the block, then restore the
    old values in reverse order."""
    saved = []
    try:
        for obj, attr, value in changes:
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def gradient_steps(
    z: dict[int, Any],
    grad: dict[int, Any],
    etas: Sequence[float],
    steps: int,
    grad_fn: Callable[[list], list],
    evaluate: Callable[[list], None] | None = None,
) -> dict[float, dict[int, Any]]:
    """For each eta, ``steps`` steps r <- r - eta * dNLL/dr from the router's own z: the first
    with the given ``grad``, later ones with ``grad_fn(free logits)`` (layers in increasing
    order). ``evaluate`` forces lazy arrays after each step."""
    layers = sorted(z)
    logits = {}
    for eta in etas:
        free = [z[layer] - eta * grad[layer] for layer in layers]
        for _ in range(steps - 1):
            free = [r - eta * g for r, g in zip(free, grad_fn(free))]
            if evaluate is not None:
                evaluate(free)
        logits[eta] = dict(zip(layers, free))
    return logits


def heldout_count(n: int, fraction: float, cap: int) -> int:
    if n < 2:
        raise ValueError(
            f"eta auto needs at least 2 examples (one is held out to choose eta); the dataset "
            f"has {n}. Pass a fixed eta (--eta 1.0) instead"
        )
    return min(n - 1, cap, max(1, round(fraction * n)))


@dataclass
class BatchResult:
    """One batch's gradient pass, as arrays of the framework that ran it."""

    keys: dict[int, Any]  # router inputs of the kept positions [P, d]
    router_logits: dict[int, Any]  # the router's own z [P, N]
    logits: dict[float, dict[int, Any]]  # eta -> layer -> optimised r^(S) [P, N]
    loss_before: float  # summed target NLL of the plain model (teacher-forced)
    targets: int


@dataclass
class BatchPlan:
    """Batches as (part, example indices): part 0 the reference examples, then part 1 the
    held-out ones (eta auto). ``etas``: the step sizes the gradient pass computes."""

    groups: list[tuple[int, list[int]]]
    heldout: int
    etas: list[float]


def plan_batches(lengths: Sequence[int], config: BuildConfig) -> BatchPlan:
    """Hold out the last examples for eta auto and group both parts by length."""
    n = len(lengths)
    held = heldout_count(n, config.heldout, config.max_heldout) if config.auto_eta else 0
    cut = n - held
    groups = []
    for part, idx in enumerate([list(range(cut)), list(range(cut, n))]):
        part_lengths = [lengths[i] for i in idx]
        groups += [
            (part, [idx[j] for j in g]) for g in length_groups(part_lengths, config.batch_tokens)
        ]
    # with S = 1 the step is linear in eta: compute eta = 1 and scale later
    if config.steps == 1:
        etas = [1.0]
    else:
        etas = list(config.eta_grid) if config.auto_eta else [float(config.eta)]
    return BatchPlan(groups, held, etas)


def stored_logits(z, computed: list, eta: float, steps: int, etas: list[float]):
    """A layer's optimised logits at ``eta``: with S = 1 the step is linear in eta,
    ``z + eta * (r(1) - z)``; otherwise the logits computed at that eta. Works on MLX and
    torch arrays alike. ``computed``: one array per eta of ``etas``."""
    if steps == 1:
        return z + eta * (computed[0] - z)
    return computed[etas.index(eta)]


@contextmanager
def gradient_pass(
    scope: str,
    surrogate: int | None,
    token_scope: Callable[[], AbstractContextManager],
    dense_surrogate: Callable[[int], AbstractContextManager],
) -> Iterator[None]:
    """The framework's token scope when ``scope == "token"``, its dense surrogate with k'
    experts when ``surrogate``; both sides run their gradient pass inside this."""
    with ExitStack() as stack:
        if scope == "token":
            stack.enter_context(token_scope())
        if surrogate:
            stack.enter_context(dense_surrogate(surrogate))
        yield


def surrogate_rule(unselected: float, largest: float, n_experts: int, top_k: int) -> int | None:
    """k' from a gradient probe: 4k capped at N when the largest |gradient| on unselected
    experts is float rounding, else None."""
    if unselected > 1e-5 * largest:
        return None
    return min(n_experts, 4 * top_k)


def resolve_surrogate(surrogate: int | str | None, auto: Callable[[], int | None]) -> int | None:
    """``"auto"`` -> ``auto()`` (the framework's probe); None -> no surrogate; an int as is."""
    return auto() if surrogate == "auto" else surrogate


def scan_eta_grid(
    score: Callable[[float], float],
    baseline: float,
    grid: tuple[float, ...],
    patience: int | None,
) -> dict:
    """Score the etas of ``grid`` in increasing order; stop once ``patience`` scores in a row
    are worse than the best so far (the rest are recorded as None; None: score all)."""
    scores: list[float | None] = []
    for eta in sorted(grid):  # a too-large step only gets worse: stop once it has turned
        scores.append(score(eta))
        done = [s for s in scores if s is not None]
        if patience and len(done) > patience and min(done) < min(done[-patience:]):
            break
    grid = tuple(sorted(grid))
    scores += [None] * (len(grid) - len(scores))
    best = min((i for i in range(len(grid)) if scores[i] is not None), key=lambda i: scores[i])
    if not scores[best] < baseline or math.isnan(scores[best]):
        warnings.warn(
            f"eta auto: no eta in {list(grid)} lowered the held-out NLL "
            f"(plain {baseline:.4f}, best {scores[best]:.4f} at eta={grid[best]}); "
            "the memory may not help on this data",
            stacklevel=3,
        )
    return {"grid": list(grid), "heldout_nll": scores, "plain_nll": baseline, "eta": grid[best]}


def build_record(
    config: BuildConfig,
    dataset,
    *,
    eta: float,
    tuning: dict | None,
    surrogate: int | None,
    entries: int,
    loss_before: float,
    seconds: float,
    heldout_examples: int,
    **extra,
) -> dict:
    """The ``build`` metadata of a memory: the settings (``config``, read back by appends),
    what was chosen, the dataset with its hash, counts and timing."""
    tokens = dataset.num_tokens()
    if tuning is not None:
        tuning = {**tuning, "heldout_examples": heldout_examples}
    return {
        "config": config.record(),
        "eta": eta,
        "eta_auto": tuning,
        "steps": config.steps,
        "scope": config.scope,
        "dense_surrogate": surrogate,
        "keep": config.keep,
        "seed": config.seed,
        "max_seq_len": config.max_seq_len,
        "datasets": [
            {
                "name": dataset.name,
                "sha256": dataset.sha256,
                "format": dataset.format,
                "examples": len(dataset.examples),
                "tokens": tokens,
                "targets": dataset.num_targets(),
            }
        ],
        "examples": len(dataset.examples),
        "tokens": tokens,
        "entries": entries,
        "nll_before": loss_before / max(dataset.num_targets(), 1),
        "seconds": round(seconds, 3),
        "mlx_knnmoe": __version__,
        **extra,
    }
