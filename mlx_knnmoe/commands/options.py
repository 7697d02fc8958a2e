"""What every command shares: the click conventions, error reporting, and the model, memory
and retrieval options."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import click

from ..bundled import MODEL_DIR
from ..config import MIX_MODES, SEARCHES, SIMILARITIES, KNNConfig
from ..config import parse_skip as parse_skip_text
from ..loading import load, load_memory
from ..retrieval.attach import attach

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# errors that mean bad input or a bad file, not a bug: one line on stderr, exit status 1
# (MemoryFormatError, MemoryMismatchError and DataError are ValueErrors; file-system errors
# are OSErrors)
EXPECTED_ERRORS = (ValueError, OSError, ImportError)
VERBOSE = "mlx_knnmoe.verbose"


class Finite(click.FloatRange):
    """A finite number within a range (click's FloatRange lets nan through)."""

    name = "finite number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


COUNT = click.IntRange(min=1)  # counts and sizes: at least one
NON_NEGATIVE = click.IntRange(min=0)
FRACTION = Finite(0.0, 1.0)  # a probability, [0, 1]
NON_NEGATIVE_NUMBER = Finite(min=0.0)
POSITIVE_NUMBER = Finite(
    min=0.0, min_open=True
)  # ctx.meta key: --verbose on the command or on the group


def command(**kwargs) -> Callable:
    """``click.command`` with the package's conventions: ``-h``/``--help``; ``--verbose``; the
    errors we expect (bad values, bad or missing files, a missing optional package) reported
    as one line on stderr with exit status 1, with the traceback only under ``--verbose``;
    warnings printed as one ``warning: ...`` line each."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # each warning once per place
                warnings.showwarning = _warning_line
                try:
                    return fn(*args, **kw)
                except EXPECTED_ERRORS as e:
                    if click.get_current_context().meta.get(VERBOSE):
                        raise
                    raise click.ClickException(one_line(e)) from e

        return click.command(context_settings=CONTEXT, **kwargs)(verbose_option(run))

    return decorate


def verbose_option(fn):
    """--verbose: a traceback with every error (the group takes it too, before a command)."""
    return click.option(
        "--verbose",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbose,
        help="Show the traceback of an error.",
    )(fn)


def _set_verbose(ctx, param, value) -> None:
    if value:
        ctx.meta[VERBOSE] = True


def one_line(error: BaseException) -> str:
    """An error's message on one line (a message listing problems line by line joins them)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, *rest = lines
    return head if not rest else f"{head.rstrip(':')}: {'; '.join(rest)}"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def model_option(fn):
    """--model (default: the bundled demo model) and --adapter-path."""
    fn = click.option("--adapter-path", default=None, help="LoRA adapters to load with the model.")(
        fn
    )
    return click.option(
        "--model",
        default=str(MODEL_DIR),
        show_default="the bundled demo model",
        help="Model directory or Hugging Face repo id.",
    )(fn)


def knn_options(fn):
    """--memory and the retrieval flags; the command receives them as keyword arguments."""
    memory = click.option(
        "--memory",
        default=None,
        help="Memory: a file, a NAME packaged in <model>/memories/, or repo_id:file.",
    )
    return memory(retrieval_options(fn))


def retrieval_options(fn):
    """The retrieval flags (--knn-k, --similarity, --mix, ...); see ``knn_overrides``."""
    options = [
        click.option("--knn-k", type=COUNT, default=None, help="Neighbours per token (default 1)."),
        click.option(
            "--similarity",
            type=click.Choice(SIMILARITIES),
            default=None,
            help="Neighbour similarity (default rbf).",
        ),
        click.option(
            "--mix",
            type=click.Choice(MIX_MODES),
            default=None,
            help="How memory and router combine (default topk: same expert cost).",
        ),
        click.option(
            "--lambda-scale",
            type=NON_NEGATIVE_NUMBER,
            default=None,
            help="Scale of the confidence lambda before clipping to [0, 1]; 0 = off.",
        ),
        click.option(
            "--search",
            type=click.Choice(SEARCHES),
            default=None,
            help="exact (MLX matmul), ivf (MLX inverted lists), hnsw (hnswlib) or auto "
            "(by memory size).",
        ),
        click.option(
            "--nprobe",
            type=click.IntRange(min=1),
            default=None,
            help="Inverted lists an ivf search reads per token (default 8).",
        ),
        click.option(
            "--bandwidth",
            type=POSITIVE_NUMBER,
            default=None,
            help="RBF bandwidth for every layer instead of the calibrated ones.",
        ),
        click.option(
            "--skip-confident",
            default=None,
            callback=parse_skip,
            metavar="SIGNAL:T",
            help="Selective retrieval: tokens the router is sure of keep their own routing; "
            "entropy:T skips where normalised router entropy < T, margin:T where top-1 minus "
            "top-2 score > T.",
        ),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)


def parse_skip(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_skip_text(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def knn_overrides(kwargs: dict) -> dict:
    """Pop the retrieval flags from a command's kwargs into KNNConfig field overrides."""
    return {
        "k": kwargs.pop("knn_k"),
        "similarity": kwargs.pop("similarity"),
        "mix": kwargs.pop("mix"),
        "lambda_scale": kwargs.pop("lambda_scale"),
        "search": kwargs.pop("search"),
        "nprobe": kwargs.pop("nprobe", None),
        "bandwidth": kwargs.pop("bandwidth"),
        **_skip_fields(kwargs.pop("skip_confident")),
    }


def _skip_fields(skip) -> dict:
    return (
        {"skip": None, "skip_threshold": None}
        if skip is None
        else dict(skip=skip[0], skip_threshold=skip[1])
    )


def load_with_memory(model: str, memory: str | None, overrides: dict, adapter_path=None):
    """Load the model (and adapters) with mlx-lm, attach the memory with the flags applied."""
    model_obj, tokenizer = load(model, adapter_path=adapter_path)
    config = None
    if memory is not None:
        mem = load_memory(memory, model)
        config = KNNConfig.from_memory_defaults(mem.retrieval, **overrides)
        attach(model_obj, mem, config)
    return model_obj, tokenizer, config


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer renders chats (most base checkpoints ship without a template)."""
    found = getattr(tokenizer, "has_chat_template", getattr(tokenizer, "chat_template", None))
    return bool(found)


def stats_table(stats: dict[int, dict]) -> str:
    lines = [f"{'layer':>5}  {'tokens':>7}  {'mean lambda':>11}  {'experts changed':>15}"]
    for layer, s in sorted(stats.items()):
        lines.append(
            f"{layer:>5}  {s['tokens']:>7}  {s['mean_lambda']:>11.4f}  {s['changed_share']:>14.1%}"
        )
    if stats:
        n = len(stats)
        lines.append(
            f"{'mean':>5}  {'':>7}  {sum(s['mean_lambda'] for s in stats.values()) / n:>11.4f}"
            f"  {sum(s['changed_share'] for s in stats.values()) / n:>14.1%}"
        )
    return "\n".join(lines)
