"""The ``mlx_knnmoe.build_memory`` command (the Python API is ``builder.build_memory``)."""

from __future__ import annotations

import sys

import click

from .batches import KEEP
from .build import SCOPES
from .builder import build_memory
from .config import KNNConfig
from .data import FORMATS
from .distributed import launch, report_status, world
from .memory import Memory
from .options import knn_overrides, retrieval_options
from .tuning import DEFAULT_ETA_GRID


def _eta(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        eta = float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a number, got {value!r}") from None
    if eta <= 0:
        raise click.BadParameter(f"eta must be > 0, got {eta}")
    return eta


def _grid(value: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not grid or min(grid) <= 0:
        raise click.BadParameter(f"every eta must be > 0, got {value!r}")
    return grid


def _surrogate(value: str) -> int | str | None:
    if value in ("auto", "off"):
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number, auto or off, got {value!r}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Model directory or Hugging Face repo id.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Memory file (default: the --append-to file)."
)
@click.option(
    "--append-to",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Add the new entries to this memory of the same model (with its eta unless --eta).",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--restart", is_flag=True, help="Discard a partial build of --out and start over.")
@click.option(
    "--eta",
    default="auto",
    show_default=True,
    help="Step size, or 'auto': pick from --eta-grid by held-out NLL through retrieval.",
)
@click.option("--eta-grid", default=",".join(f"{e:g}" for e in DEFAULT_ETA_GRID), show_default=True)
@click.option(
    "--eta-patience",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Stop the grid after this many etas in a row score worse than the best (0: all).",
)
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--scope",
    type=click.Choice(SCOPES),
    default="sequence",
    show_default=True,
    help="sequence: gradient of the summed NLL; token: each position's own loss only.",
)
@click.option(
    "--dense-surrogate",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _surrogate(value),
    help="Route to K' experts in the gradient pass so unselected experts get a step: a number, "
    "off, or auto (4k where the router gives unselected experts no gradient, else off).",
)
@click.option(
    "--keep",
    type=click.Choice(KEEP),
    default="all",
    show_default=True,
    help="Store all non-padding positions, or only those that predict a target.",
)
@click.option("--max-examples", type=int, default=None, help="Use at most this many examples.")
@click.option("--max-seq-len", type=int, default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffling seed.")
@click.option(
    "--batch-tokens", type=int, default=4096, show_default=True, help="Padded tokens per batch."
)
@click.option(
    "--heldout", type=float, default=0.1, show_default=True, help="Share held out for eta auto."
)
@click.option("--max-heldout", type=int, default=200, show_default=True)
@retrieval_options
@click.option(
    "--ranks",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel ranks per host, run under mlx.launch; the file equals a 1-rank build.",
)
@click.option("--hosts", default="127.0.0.1", show_default=True, help="For --ranks.")
@click.option("--backend", default="ring", show_default=True, help="For --ranks: ring or mpi.")
@click.option("--rank-status", default=None, hidden=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(**kw) -> None:
    """Build a kNN-MoE memory from a local dataset (one gradient step on the routing logits)."""
    from mlx_lm import load

    if kw["ranks"] > 1 and kw["rank_status"] is None:
        try:
            launch(_rank_argv(), kw["ranks"], kw["hosts"], kw["backend"])
        except RuntimeError as e:
            raise click.ClickException(str(e)) from e
        return
    if kw["out"] is None and kw["append_to"] is None:
        raise click.UsageError("give --out (or --append-to)")
    overrides = knn_overrides(kw)
    eta, grid = _eta(kw["eta"]), _grid(kw["eta_grid"])
    source = click.get_current_context().get_parameter_source("eta")
    if kw["append_to"] and source == click.core.ParameterSource.DEFAULT:
        eta = "same"
    model, tokenizer = load(kw["model"])
    error = None
    try:
        memory = build_memory(
            model,
            tokenizer,
            kw["data"],
            format=kw["fmt"],
            out=kw["out"],
            eta=eta,
            eta_grid=grid,
            eta_patience=kw["eta_patience"] or None,
            steps=kw["steps"],
            scope=kw["scope"],
            surrogate=kw["dense_surrogate"],
            keep=kw["keep"],
            max_examples=kw["max_examples"],
            max_seq_len=kw["max_seq_len"],
            seed=kw["seed"],
            batch_tokens=kw["batch_tokens"],
            heldout=kw["heldout"],
            max_heldout=kw["max_heldout"],
            config=KNNConfig().updated(**overrides),
            force=kw["force"],
            progress=not kw["quiet"],
            restart=kw["restart"],
            append_to=kw["append_to"],
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        error = e
        raise click.ClickException(str(e)) from e
    except BaseException as e:
        error = e
        raise
    finally:
        report_status(kw["rank_status"], world(), error)
    if memory is not None:  # None on ranks other than 0 of a distributed build
        click.echo(summary(memory))


def _rank_argv() -> list[str]:
    """This command's arguments without the launcher's own options."""
    args = sys.argv[1:]
    if args and args[0] == "build_memory":  # run as ``mlx_knnmoe build_memory``
        args = args[1:]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--ranks", "--hosts", "--backend"):
            skip = True
        elif not a.startswith(("--ranks=", "--hosts=", "--backend=")):
            out.append(a)
    return out


def summary(memory: Memory) -> str:
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
    return "\n".join(lines)


main = cli

if __name__ == "__main__":
    main()
