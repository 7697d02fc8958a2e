"""``mlx_knnmoe.build_memory``: build a memory from a local dataset (the Python API is
``mlx_knnmoe.build_memory``, build/pipeline.py)."""

from __future__ import annotations

import sys

import click
from mlx_lm import load

from ..build.budget import budget_bytes, fit_budget, model_weight_bytes, parse_budget
from ..build.distributed import launch, report_status, world
from ..build.pipeline import build_memory
from ..build.pseudo_labels import pseudo_label_dataset
from ..config import BuildConfig, KNNConfig
from ..data.examples import Dataset
from ..memory.compress import VALUE_FORMATS
from .build_options import REFINE_FIELDS, build_options, build_settings, refine_options, summary
from .options import EXISTING_FILE, command, knn_overrides

# BuildConfig fields set by options of this command only (not in build_options)
OWN_FIELDS = (
    *REFINE_FIELDS,
    "pseudo_labels",
    "pseudo_max_tokens",
    "teacher",
)


@command()
@build_options
@click.option(
    "--append-to",
    type=EXISTING_FILE,
    help="Add the new entries to this memory of the same model (--out defaults to it); its "
    "recorded build settings are the defaults, changed only by the flags given.",
)
@refine_options
@click.option(
    "--pseudo-labels",
    is_flag=True,
    help="The data holds prompts only ('prompt', or 'text' to continue): answer them greedily "
    "with the model (or --teacher) and build from prompt + answer as from gold records.",
)
@click.option(
    "--teacher",
    default=None,
    metavar="MODEL",
    help="With --pseudo-labels: the model (directory or Hugging Face id, the same tokenizer) "
    "that writes the answers instead of --model.",
)
@click.option(
    "--pseudo-max-tokens",
    type=click.IntRange(min=1),
    default=BuildConfig.pseudo_max_tokens,
    show_default=True,
    help="With --pseudo-labels: the longest answer, in tokens (generation also stops at an "
    "end token).",
)
@click.option(
    "--budget",
    default="auto",
    show_default=True,
    metavar="SIZE",
    help="Fit the memory in SIZE: a share of the model's weight bytes (10%) or bytes (400MB), "
    "by value and key format, PCA and merging near-duplicate entries (build/budget.py); auto: "
    "10% for models of 1 GB of weights or more, none below; off: none.",
)
@click.option(
    "--values",
    type=click.Choice(VALUE_FORMATS),
    default="float16",
    show_default=True,
    help="The dtype the optimised logits are stored in (float16 kept the whole gain on the "
    "bundled benchmark: EXPERIMENTS.md).",
)
@click.option("--restart", is_flag=True, help="Discard a partial build of --out and start over.")
@click.option(
    "--ranks",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel ranks per host, run under mlx.launch; the file equals a 1-rank build.",
)
@click.option("--hosts", default="127.0.0.1", show_default=True, help="For --ranks.")
@click.option("--backend", default="ring", show_default=True, help="For --ranks: ring or mpi.")
@click.option("--rank-status", hidden=True)
def cli(**kw) -> None:
    """Build a kNN-MoE memory from a local dataset (one gradient step on the routing logits)."""
    if kw["ranks"] > 1 and kw["rank_status"] is None:
        try:
            launch(_rank_argv(), kw["ranks"], kw["hosts"], kw["backend"])
        except RuntimeError as e:
            raise click.ClickException(str(e)) from e
        return
    if kw["out"] is None and kw["append_to"] is None:
        raise click.UsageError("give --out (or --append-to)")
    try:
        parse_budget(kw["budget"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--budget") from None
    retrieval = KNNConfig().updated(**knn_overrides(kw))
    appending = kw["append_to"] is not None
    settings = build_settings(kw, only_given=appending)
    settings.update({k: kw[k] for k in OWN_FIELDS if kw[k] is not None})
    try:
        BuildConfig().updated(**settings)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    model, tokenizer = load(kw["model"])
    data = kw["data"]
    if settings.get("pseudo_labels"):
        data = _pseudo_labelled(model, tokenizer, data, BuildConfig().updated(**settings))
    error = None
    try:
        memory = build_memory(
            model,
            tokenizer,
            data,
            None if appending else BuildConfig(**settings),
            retrieval=retrieval,
            out=kw["out"],
            force=kw["force"],
            progress=not kw["quiet"],
            restart=kw["restart"],
            append_to=kw["append_to"],
            values=kw["values"],
            **(settings if appending else {}),
        )
    except BaseException as e:
        error = e
        raise
    finally:
        report_status(kw["rank_status"], world(), error)
    if memory is None:  # None on ranks other than 0 of a distributed build
        return
    limit = budget_bytes(kw["budget"], model)
    if limit is not None:
        memory = fit_budget(memory, limit, model, log=lambda m: click.echo(m, err=True))
        memory.save(kw["out"] or kw["append_to"], force=True)
    click.echo(summary(memory))
    weights = model_weight_bytes(model)
    click.echo(
        f"memory size {memory.nbytes() / 1e6:.1f} MB, {memory.nbytes() / weights:.1%} of the "
        f"model's {weights / 1e6:.1f} MB of weights"
    )


def _pseudo_labelled(model, tokenizer, path: str, config: BuildConfig) -> Dataset:
    """The prompts of ``path`` with answers generated by the model or the teacher."""
    teacher = load(config.teacher) if config.teacher else None
    dataset, info = pseudo_label_dataset(model, tokenizer, path, config, teacher)
    click.echo(
        f"pseudo-labels: {info['prompts']} prompts answered by {config.teacher or 'the model'} "
        f"in {info['seconds']:.1f} s ({info['empty_answers']} empty answers left out)",
        err=True,
    )
    return dataset


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


main = cli

if __name__ == "__main__":
    main()
