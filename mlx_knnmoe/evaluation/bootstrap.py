"""Paired bootstrap confidence intervals and zero-shot perplexity buckets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Statistic = Callable[[dict[str, np.ndarray]], float]


def mean_of(key: str) -> Statistic:
    return lambda arrays: float(arrays[key].mean())


def perplexity(arrays: dict[str, np.ndarray]) -> float:
    return float(np.exp(arrays["nll"].sum() / max(arrays["targets"].sum(), 1.0)))


def paired_bootstrap(
    stat: Statistic,
    base: dict[str, np.ndarray],
    other: dict[str, np.ndarray],
    samples: int = 1000,
    seed: int = 0,
) -> dict:
    """stat(other) - stat(base) with a 95% percentile interval, resampling the same example
    indices for both (the examples are paired)."""
    n = len(next(iter(base.values())))
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for s in range(samples):
        idx = rng.integers(0, n, n)
        diffs[s] = stat({k: v[idx] for k, v in other.items()}) - stat(
            {k: v[idx] for k, v in base.items()}
        )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": stat(other) - stat(base), "ci95": [float(lo), float(hi)]}


def buckets(values: np.ndarray, n_buckets: int = 4) -> tuple[np.ndarray, list[tuple]]:
    """Quantile buckets of ``values``: the bucket of each example and each bucket's range."""
    n_buckets = max(1, min(n_buckets, len(values)))
    edges = np.quantile(values, np.linspace(0, 1, n_buckets + 1))
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_buckets - 1)
    return which, [(float(edges[b]), float(edges[b + 1])) for b in range(n_buckets)]
