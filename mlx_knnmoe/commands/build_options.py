"""The options and output of the memory-build commands (``mlx_knnmoe.build_memory`` and the
PyTorch companion's ``python -m mlx_knnmoe.pytorch.build_memory``)."""

from __future__ import annotations

import math

import click

from ..config import DEFAULT_ETA_GRID, KEEP, SCOPES, BuildConfig
from ..memory.file_format import MemoryData
from .options import (
    BATCH_TOKENS,
    COUNT,
    EXISTING_FILE,
    FORMAT,
    MODEL,
    NEW_FILE,
    Finite,
    choice_option,
    force_option,
    limit_option,
    max_seq_length_option,
    retrieval_options,
    stacked,
)

# command-line option -> BuildConfig field
BUILD_FIELDS = {
    "fmt": "format",
    "eta": "eta",
    "eta_grid": "eta_grid",
    "eta_patience": "eta_patience",
    "steps": "steps",
    "scope": "scope",
    "dense_surrogate": "surrogate",
    "keep": "keep",
    "max_examples": "max_examples",
    "max_seq_len": "max_seq_len",
    "seed": "seed",
    "batch_tokens": "batch_tokens",
    "heldout": "heldout",
    "max_heldout": "max_heldout",
}


# BuildConfig fields of ``refine_options``: what happens after eta (build/refine.py)
REFINE_FIELDS = ("recapture", "calibrate", "layer_eta", "guard", "guard_samples")

refine_options = stacked(
    [
        click.option(
            "--recapture",
            type=click.IntRange(min=0),
            help="Passes that re-capture the keys with the memory attached, so deeper layers' "
            "keys are the router inputs inference sees (MoE layers - 1 passes: exactly). "
            f"[default: {BuildConfig.recapture}]",
        ),
        click.option(
            "--calibrate/--no-calibrate",
            default=None,
            help="With eta auto: choose eta and each layer's bandwidth on the held-out slice, "
            "keeping the guard set's NLL within noise. "
            f"[default: {'calibrate' if BuildConfig.calibrate else 'no-calibrate'}]",
        ),
        click.option(
            "--layer-eta/--no-layer-eta",
            default=None,
            help="With --calibrate: then choose each kept layer's own eta (x1/3, x3 around the "
            "chosen one) the same way. "
            f"[default: {'layer-eta' if BuildConfig.layer_eta else 'no-layer-eta'}]",
        ),
        click.option(
            "--guard",
            type=EXISTING_FILE,
            help="Original-domain text for --calibrate's guard (default: text sampled from the "
            "model).",
        ),
        click.option(
            "--guard-samples",
            type=click.IntRange(min=2),
            help="Sequences sampled from the model for the guard when there is no --guard file; "
            "more make the guard stricter (its noise band narrower). "
            f"[default: {BuildConfig.guard_samples}]",
        ),
    ]
)


def parse_eta(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        eta = float(value)
    except ValueError:
        raise click.BadParameter(
            f"expected 'auto' or a number, got {value!r}", param_hint="--eta"
        ) from None
    if not (math.isfinite(eta) and eta > 0):
        raise click.BadParameter(f"eta must be finite and > 0, got {value!r}", param_hint="--eta")
    return eta


def _grid(value: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {value!r}", param_hint="--eta-grid"
        ) from None
    if not grid or not all(math.isfinite(e) and e > 0 for e in grid):
        raise click.BadParameter(
            f"every eta must be finite and > 0, got {value!r}", param_hint="--eta-grid"
        )
    return grid


def _surrogate(value: str) -> int | str | None:
    if value in ("auto", "off"):
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number, auto or off, got {value!r}") from None


def build_options(fn):
    """--model, --data, --out, --force, every BuildConfig flag, the retrieval flags, --quiet."""
    options = [
        MODEL,
        click.option("--data", required=True, type=EXISTING_FILE),
        FORMAT,
        click.option("--out", type=NEW_FILE, help="The memory file to write."),
        force_option("--out"),
        click.option(
            "--eta",
            default="auto",
            show_default=True,
            help="Step size, or 'auto': pick from --eta-grid by held-out NLL through retrieval.",
        ),
        click.option(
            "--eta-grid", default=",".join(f"{e:g}" for e in DEFAULT_ETA_GRID), show_default=True
        ),
        click.option(
            "--eta-patience",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="Stop the grid after this many etas in a row score worse than the best (0: all).",
        ),
        click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True),
        choice_option(
            "--scope",
            SCOPES,
            default="sequence",
            help="sequence: gradient of the summed NLL; token: each position's own loss only.",
        ),
        click.option(
            "--dense-surrogate",
            default="auto",
            show_default=True,
            callback=lambda ctx, param, value: _surrogate(value),
            help="Route to K' experts in the gradient pass so unselected experts get a step: "
            "a number, "
            "off, or auto (4k where the router gives unselected experts no gradient, else off).",
        ),
        choice_option(
            "--keep",
            KEEP,
            default="all",
            help="Store all non-padding positions, or only those that predict a target.",
        ),
        limit_option("Use at most this many examples."),
        max_seq_length_option(1024),
        click.option("--seed", type=int, default=0, show_default=True, help="Shuffling seed."),
        BATCH_TOKENS,
        click.option(
            "--heldout",
            type=Finite(0.0, 1.0, min_open=True, max_open=True),
            default=0.1,
            show_default=True,
            help="Share held out for eta auto.",
        ),
        click.option("--max-heldout", type=COUNT, default=200, show_default=True),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return stacked([*options, retrieval_options])(fn)


def build_settings(kw: dict, only_given: bool = False) -> dict:
    """BuildConfig fields from a command's keyword arguments (removed from ``kw``), checked
    by BuildConfig; ``only_given``: only the flags given on the command line."""
    kw["eta"], kw["eta_grid"] = parse_eta(kw["eta"]), _grid(kw["eta_grid"])
    ctx = click.get_current_context()
    default = click.core.ParameterSource.DEFAULT
    settings = {
        field: kw.pop(option)
        for option, field in BUILD_FIELDS.items()
        if not only_given or ctx.get_parameter_source(option) != default
    }
    try:
        BuildConfig().updated(**settings)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    return settings


def summary(memory: MemoryData) -> str:
    b = memory.build
    lines = [
        f"wrote {memory.path}: {b['entries']} entries x {len(memory.layers)} MoE layers "
        f"from {b['examples']} examples ({b['tokens']} tokens)"
    ]
    if "parts" in b:  # appended: describe the part just built
        lines[0] += f" in {len(b['parts'])} parts"
        b = b["parts"][-1]
    lines[0] += f"; built {b['examples']} examples in {b['seconds']:.1f} s"
    if b["eta_auto"]:
        t = b["eta_auto"]
        lines.append(f"eta auto on {t['heldout_examples']} held-out examples (NLL per target):")
        lines.append(f"  {'eta':>8}  {'NLL':>8}  {'change':>8}")
        lines.append(f"  {'plain':>8}  {t['plain_nll']:>8.4f}  {'':>8}")
        for e, s in zip(t["grid"], t["heldout_nll"]):
            if s is None:
                lines.append(f"  {e:>8g}  {'skipped':>8}")
                continue
            mark = "  <- chosen" if e == b["eta"] else ""
            change = (s - t["plain_nll"]) / t["plain_nll"]
            lines.append(f"  {e:>8g}  {s:>8.4f}  {change:>+8.2%}{mark}")
    else:
        lines.append(f"eta {b['eta']:g}")
    if b.get("calibration"):
        c = b["calibration"]
        scales = ", ".join(f"layer {layer}: {s:g}" for layer, s in c["scales"].items())
        lines.append(
            f"calibrated on held-out NLL under a {c['guard_sequences']}-sequence guard: "
            f"eta {c['eta']:g}, bandwidth scales {scales} (0: layer off)"
        )
        etas = c.get("layer_eta") or {}
        kept = [layer for layer, s in c["scales"].items() if s > 0 and layer in etas]
        if any(etas[layer] != c["eta"] for layer in kept):
            per_layer = ", ".join(f"layer {layer}: {etas[layer]:g}" for layer in kept)
            lines.append(f"eta per layer: {per_layer}")
    return "\n".join(lines)
