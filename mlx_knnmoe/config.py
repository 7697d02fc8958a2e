"""Settings, validated once: ``KNNConfig`` (retrieval at inference) and ``BuildConfig`` (how a
memory is built). Framework-free: the MLX package and the PyTorch companion share them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .data.formats import FORMATS

SIMILARITIES = ("rbf", "cosine")
MIX_MODES = ("union", "topk", "logits")
SEARCHES = ("auto", "exact", "ivf", "hnsw")
SKIP_SIGNALS = (None, "entropy", "margin")
SCOPES = ("sequence", "token")
KEEP = ("all", "targets")
DEFAULT_ETA_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def parse_skip(text: str) -> tuple[str, float]:
    """``entropy:T`` or ``margin:T`` (selective retrieval) -> (signal, threshold)."""
    signal, _, threshold = str(text).partition(":")
    try:
        value = float(threshold)
    except ValueError:
        value = None
    if signal not in SKIP_SIGNALS[1:] or value is None or not math.isfinite(value):
        raise ValueError(f"expected entropy:T or margin:T (T a finite number), got {text!r}")
    return signal, value


def _updated(config, changes: dict):
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


def _known(cls, record: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


@dataclass(frozen=True)
class KNNConfig:
    """How retrieval and mixing run at inference.

    k: neighbours per token, their values weighted by similarity (the paper finds 1 best; with
    re-captured keys and calibration 4 gained more on both benchmarks of EXPERIMENTS.md).
    similarity: ``rbf`` or ``cosine``.
    mix: ``topk`` (blend dense scores, the model keeps its own k experts; same cost as the
    plain model), ``union`` (up to k + K*k experts run), ``logits`` (blend logits).
    lambda_scale: multiplies the confidence before clipping to [0, 1]; 0 turns retrieval off.
    search: ``exact``, ``hnsw`` or ``auto``. bandwidth: RBF tau for every layer instead of
    the per-layer value stored in the memory. ef: hnswlib query breadth. nprobe: inverted
    lists an ``ivf`` search reads per token.
    skip / skip_threshold: selective retrieval. Tokens the router is already confident about
    keep their own routing: ``entropy`` skips where the normalised entropy of the router's
    scores is below the threshold, ``margin`` where top-1 minus top-2 score is above it.
    """

    k: int = 4
    similarity: str = "rbf"
    mix: str = "topk"
    lambda_scale: float = 1.0
    search: str = "auto"
    bandwidth: float | None = None
    ef: int = 64
    nprobe: int = 8
    skip: str | None = None
    skip_threshold: float = 0.0

    def __post_init__(self):
        _at_least("k", self.k, 1)
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        _finite("lambda_scale", self.lambda_scale, low=0.0)
        _at_least("nprobe", self.nprobe, 1)
        if self.skip not in SKIP_SIGNALS:
            raise ValueError(f"skip must be one of {SKIP_SIGNALS}, got {self.skip!r}")
        if self.bandwidth is not None:
            _positive_number("bandwidth", self.bandwidth)
        _at_least("ef", self.ef, 1)
        _finite("skip_threshold", self.skip_threshold)

    def updated(self, **changes) -> KNNConfig:
        """A copy with the given fields changed; ``None`` values are ignored."""
        return _updated(self, changes)

    def record(self) -> dict:
        """The settings as stored in a memory's ``retrieval`` metadata."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_memory_defaults(cls, retrieval: dict, **overrides) -> KNNConfig:
        """Package defaults, then the memory file's recorded defaults, then ``overrides``."""
        return cls(**_known(cls, retrieval)).updated(**overrides)


@dataclass(frozen=True)
class BuildConfig:
    """How a memory is built (README, "Building a memory", explains each setting).

    format: the dataset's record format. eta: the step size, or ``"auto"`` (chosen from
    ``eta_grid`` by the NLL of a held-out slice: ``heldout`` of the examples, at most
    ``max_heldout``; the scan stops after ``eta_patience`` worse points in a row, None or 0:
    never). steps: gradient steps S. scope: ``sequence`` or ``token``. surrogate: K' experts
    in the gradient pass, ``"auto"`` or None. keep: store ``all`` non-padding positions or
    only ``targets``. max_examples, max_seq_len, seed: which examples, how long, shuffled how.
    batch_tokens: padded tokens per batch. recapture: passes that re-capture the keys with
    the memory attached (0: keys from the plain model; MoE layers - 1 passes reach the
    fixed point where every key is the router input inference sees). calibrate (with eta
    auto): choose eta and each layer's bandwidth scale on the held-out slice, guarded by
    ``guard`` (a text file of the original domain) or by ``guard_samples`` sequences sampled
    from the model;
    layer_eta: calibration then also chooses each kept layer's own eta (off by default: with
    K = 4 it leaked onto the original domain of the natural-text benchmark).
    pseudo_labels: the dataset holds prompts only; their answers are generated greedily (at
    most ``pseudo_max_tokens`` tokens) by the model or by ``teacher`` (a model directory or
    Hugging Face id with the model's tokenizer), see build/pseudo_labels.py.
    """

    format: str = "auto"
    eta: float | str = "auto"
    eta_grid: tuple[float, ...] = DEFAULT_ETA_GRID
    eta_patience: int | None = 2
    steps: int = 1
    scope: str = "sequence"
    surrogate: int | str | None = "auto"
    keep: str = "all"
    max_examples: int | None = None
    max_seq_len: int = 1024
    seed: int = 0
    batch_tokens: int = 4096
    heldout: float = 0.1
    max_heldout: int = 200
    recapture: int = 1
    calibrate: bool = True
    guard: str | None = None
    guard_samples: int = 24
    layer_eta: bool = False
    pseudo_labels: bool = False
    pseudo_max_tokens: int = 64
    teacher: str | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # normalise spellings in a frozen dataclass
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.eta != "auto":
            set_(self, "eta", _positive_number("eta", self.eta))
        grid = tuple(_positive_number("eta grid value", e) for e in self.eta_grid)
        if not grid:
            raise ValueError("the eta grid is empty")
        set_(self, "eta_grid", grid)
        if self.eta_patience is not None and (
            not isinstance(self.eta_patience, int) or self.eta_patience < 0
        ):
            raise ValueError(f"eta_patience must be an integer >= 0, got {self.eta_patience!r}")
        set_(self, "eta_patience", self.eta_patience or None)
        _at_least("steps", self.steps, 1)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.surrogate in (0, "off"):
            set_(self, "surrogate", None)
        elif self.surrogate not in (None, "auto"):
            _at_least("dense surrogate k'", self.surrogate, 1)
        if self.keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {self.keep!r}")
        if self.max_examples is not None:
            _at_least("max_examples", self.max_examples, 1)
        _at_least("max_seq_len", self.max_seq_len, 2)
        _at_least("batch_tokens", self.batch_tokens, 1)
        _at_least("max_heldout", self.max_heldout, 1)
        _at_least("recapture", self.recapture, 0)
        _at_least("guard_samples", self.guard_samples, 2)
        _at_least("pseudo_max_tokens", self.pseudo_max_tokens, 1)
        if self.teacher is not None and not self.pseudo_labels:
            raise ValueError("a teacher generates pseudo-labels: it needs pseudo_labels on")
        if self.pseudo_labels and self.format not in ("auto", "completion", "text"):
            raise ValueError(
                f"pseudo_labels read prompts of format auto, completion or text, not {self.format}"
            )
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.heldout, (int, float)) and 0 < self.heldout < 1):
            raise ValueError(f"heldout must be a fraction in (0, 1), got {self.heldout!r}")
        set_(self, "eta_grid", tuple(sorted(self.eta_grid)))

    @property
    def auto_eta(self) -> bool:
        return self.eta == "auto"

    def updated(self, **changes) -> BuildConfig:
        """A copy with the given fields changed; ``None`` values are ignored."""
        return _updated(self, changes)

    def record(self) -> dict:
        """The settings as stored in a memory's ``build.config`` metadata."""
        out = asdict(self)
        out["eta_grid"] = list(self.eta_grid)
        return out

    @classmethod
    def from_record(cls, record: dict, **overrides) -> BuildConfig:
        """The settings a memory was built with (its ``build.config``), then ``overrides``."""
        known = _known(cls, record)
        if "eta_grid" in known:
            known["eta_grid"] = tuple(known["eta_grid"])
        return cls(**known).updated(**overrides)


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _finite(name: str, value, low: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" and >= {low:g}"
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
