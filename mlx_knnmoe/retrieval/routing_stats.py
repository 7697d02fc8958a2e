"""Per-layer routing statistics of an attached memory: tokens, mean lambda, experts changed."""

from __future__ import annotations

import mlx.core as mx


class RoutingStats:
    """Sums kept as lazy MLX scalars, so recording adds no host sync to a forward."""

    def __init__(self):
        self.records: list[tuple[mx.array, mx.array, mx.array | int]] = []
        # [T] 1.0 for the positions of the next forwards that count (padding: 0); None: all
        self.positions: mx.array | None = None

    def add(self, lam: mx.array, changed: mx.array) -> None:
        """lam [T]: each token's confidence; changed [T]: whether its experts changed."""
        w = self.positions
        if w is None or w.size != lam.size:
            self.records.append((lam.sum(), changed.sum(), lam.size))
        else:
            self.records.append(((lam * w).sum(), (changed * w).sum(), w.sum()))

    def summary(self) -> dict:
        tokens = round(sum(float(r[2]) for r in self.records))
        if not tokens:
            return {"tokens": 0, "mean_lambda": 0.0, "changed_share": 0.0}
        lam = sum(float(r[0]) for r in self.records)
        changed = sum(float(r[1]) for r in self.records)
        return {"tokens": tokens, "mean_lambda": lam / tokens, "changed_share": changed / tokens}
