"""What every command shares: the click conventions, error reporting, and the model, memory
and retrieval options."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import click
import mlx.core as mx

from ..bundled import MODEL_DIR
from ..config import MIX_MODES, SEARCHES, SIMILARITIES, KNNConfig
from ..config import parse_skip as parse_skip_text
from ..data.formats import FORMATS
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
EXISTING_FILE = click.Path(exists=True, dir_okay=False)  # a file to read
EXISTING_DIR = click.Path(exists=True, file_okay=False)  # a folder to read
NEW_FILE = click.Path(dir_okay=False)  # a file to write
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


def stacked(options: Sequence[Callable]) -> Callable:
    """One decorator applying click ``options`` so that ``--help`` lists them in this order."""

    def decorate(fn):
        return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)

    return decorate


MODEL_HELP = "Model directory or Hugging Face repo id."
MODEL = click.option("--model", required=True, help=MODEL_HELP)  # a model the command needs
FORMAT = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True
)
BATCH_TOKENS = click.option(
    "--batch-tokens", type=COUNT, default=4096, show_default=True, help="Padded tokens per batch."
)
TRUST_REMOTE_CODE = click.option(
    "--trust-remote-code", is_flag=True, help="Allow the checkpoint's own code."
)


def choice_option(
    flag: str, choices: Iterable[str], help: str | None = None, default: str | None = None
) -> Callable:
    """``flag`` taking one of ``choices``; a default is shown in --help."""
    return click.option(
        flag,
        type=click.Choice(list(choices)),
        default=default,
        show_default=default is not None,
        help=help,
    )


def limit_option(help: str) -> Callable:
    """--limit (mlx-lm's name; --max-examples also works): at most this many examples."""
    return click.option("--limit", "--max-examples", "max_examples", type=COUNT, help=help)


def max_seq_length_option(default: int) -> Callable:
    """--max-seq-length (mlx-lm's name; --max-seq-len also works): tokens per example."""
    return click.option(
        "--max-seq-length",
        "--max-seq-len",
        "max_seq_len",
        type=click.IntRange(min=2),
        default=default,
        show_default=True,
    )


def force_option(what: str) -> Callable:
    """--force: overwrite ``what`` (the command's output) if it exists."""
    return click.option("--force", is_flag=True, help=f"Overwrite {what} if it exists.")


def named_memories_option(name: str, help: str) -> Callable:
    """--memory [NAME=]MEMORY, repeatable, given to the command as ``name``."""
    return click.option("--memory", name, multiple=True, metavar="[NAME=]MEMORY", help=help)


def sampling_options(max_tokens: int, note: str = "") -> Callable:
    """mlx-lm's sampling flags: --max-tokens/-m (default ``max_tokens``), --temp, --top-p,
    --min-p, --top-k; ``note`` ends the help of the first two (the server's: a request's
    default)."""
    return stacked(
        [
            click.option(
                "--max-tokens",
                "-m",
                type=COUNT,
                default=max_tokens,
                show_default=True,
                help=f"Tokens to generate at most{note}.",
            ),
            click.option(
                "--temp",
                type=NON_NEGATIVE_NUMBER,
                default=0.0,
                show_default=True,
                help=f"Sampling temperature{note}.",
            ),
            click.option("--top-p", type=FRACTION, default=1.0, show_default=True),
            click.option("--min-p", type=FRACTION, default=0.0, show_default=True),
            click.option("--top-k", type=NON_NEGATIVE, default=0, show_default=True),
        ]
    )


def model_option(fn):
    """--model (default: the bundled demo model) and --adapter-path."""
    return stacked(
        [
            click.option(
                "--model",
                default=str(MODEL_DIR),
                show_default="the bundled demo model",
                help=MODEL_HELP,
            ),
            click.option("--adapter-path", help="LoRA adapters to load with the model."),
        ]
    )(fn)


def knn_options(fn):
    """--memory and the retrieval flags; the command receives them as keyword arguments."""
    memory = click.option(
        "--memory",
        help="Memory: a file, a NAME packaged in <model>/memories/, or repo_id:file.",
    )
    return memory(retrieval_options(fn))


# The retrieval flags: flag, type, help; each defaults to None (the memory's recorded setting).
RETRIEVAL_FLAGS = [
    ("--knn-k", COUNT, f"Neighbours per token (default {KNNConfig.k})."),
    ("--similarity", click.Choice(SIMILARITIES), "Neighbour similarity (default rbf)."),
    (
        "--mix",
        click.Choice(MIX_MODES),
        "How memory and router combine (default topk: same expert cost).",
    ),
    (
        "--lambda-scale",
        NON_NEGATIVE_NUMBER,
        "Scale of the confidence lambda before clipping to [0, 1]; 0 = off.",
    ),
    (
        "--search",
        click.Choice(SEARCHES),
        "exact (MLX matmul), ivf (MLX inverted lists), hnsw (hnswlib) or auto (by memory size).",
    ),
    ("--nprobe", COUNT, "Inverted lists an ivf search reads per token (default 8)."),
    (
        "--bandwidth",
        POSITIVE_NUMBER,
        "RBF bandwidth for every layer instead of the calibrated ones.",
    ),
]


def retrieval_options(fn):
    """The retrieval flags (--knn-k, --similarity, --mix, ...); see ``knn_overrides``."""
    options = [click.option(flag, type=kind, help=h) for flag, kind, h in RETRIEVAL_FLAGS]
    skip = click.option(
        "--skip-confident",
        callback=parse_skip,
        metavar="SIGNAL:T",
        help="Selective retrieval: tokens the router is sure of keep their own routing; "
        "entropy:T skips where normalised router entropy < T, margin:T where top-1 minus "
        "top-2 score > T.",
    )
    return stacked([*options, skip])(fn)


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


def generation_options(max_tokens: int, seed: int | None, max_kv_size: int | None, kv_help: str):
    """The flags of the commands that generate (generate, chat): --model and --adapter-path,
    --memory and the retrieval flags, mlx-lm's sampling flags, --seed, --max-kv-size."""
    return stacked(
        [
            model_option,
            knn_options,
            sampling_options(max_tokens),
            click.option(
                "--seed",
                type=int,
                default=seed,
                show_default=seed is not None,
                help="PRNG seed for sampling.",
            ),
            click.option(
                "--max-kv-size",
                type=COUNT,
                default=max_kv_size,
                show_default=max_kv_size is not None,
                help=kv_help,
            ),
        ]
    )


def start_generation(kw: dict):
    """(model, tokenizer, retrieval config or None) as ``generation_options``' flags in a
    command's ``kw`` say: the PRNG seeded (if --seed is given), the model (and adapters) loaded
    with mlx-lm, the memory attached with the retrieval flags (popped from ``kw``) applied."""
    if kw["seed"] is not None:
        mx.random.seed(kw["seed"])
    overrides = knn_overrides(kw)
    model, tokenizer = load(kw["model"], adapter_path=kw["adapter_path"])
    config = None
    if kw["memory"] is not None:
        memory = load_memory(kw["memory"], kw["model"])
        config = KNNConfig.from_memory_defaults(memory.retrieval, **overrides)
        attach(model, memory, config)
    return model, tokenizer, config


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
