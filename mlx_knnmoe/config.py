"""Retrieval settings shared by the router wrapper, the API and the command-line tools."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .mixing import MIX_MODES, SIMILARITIES
from .search import SEARCHES

SKIP_SIGNALS = (None, "entropy", "margin")


@dataclass(frozen=True)
class KNNConfig:
    """How retrieval and mixing run at inference.

    k: neighbours per token (the paper finds 1 best). similarity: ``rbf`` or ``cosine``.
    mix: ``topk`` (blend dense scores, the model keeps its own k experts; same cost as the
    plain model), ``union`` (up to k + K*k experts run), ``logits`` (blend logits).
    lambda_scale: multiplies the confidence before clipping to [0, 1]; 0 turns retrieval off.
    search: ``exact``, ``hnsw`` or ``auto``. bandwidth: RBF tau for every layer instead of
    the per-layer value stored in the memory. ef: hnswlib query breadth.
    skip / skip_threshold: selective retrieval. Tokens the router is already confident about
    keep their own routing: ``entropy`` skips where the normalised entropy of the router's
    scores is below the threshold, ``margin`` where top-1 minus top-2 score is above it.
    """

    k: int = 1
    similarity: str = "rbf"
    mix: str = "topk"
    lambda_scale: float = 1.0
    search: str = "auto"
    bandwidth: float | None = None
    ef: int = 64
    skip: str | None = None
    skip_threshold: float = 0.0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.lambda_scale < 0:
            raise ValueError(f"lambda_scale must be >= 0, got {self.lambda_scale}")
        if self.skip not in SKIP_SIGNALS:
            raise ValueError(f"skip must be one of {SKIP_SIGNALS}, got {self.skip!r}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth}")

    def updated(self, **changes) -> "KNNConfig":
        """A copy with the given fields changed; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_memory_defaults(cls, retrieval: dict, **overrides) -> "KNNConfig":
        """Package defaults, then the memory file's recorded defaults, then ``overrides``."""
        names = {f.name for f in fields(cls)}
        base = cls(**{k: v for k, v in retrieval.items() if k in names})
        return base.updated(**overrides)
