"""``mlx_knnmoe.benchmark``: decode and prefill speed with a memory, and memory-build
throughput, as ratios to plain mlx-lm in the same run (speed/ does the work)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..speed import server_throughput
from ..speed.bench import QUICK, BenchModel
from ..speed.build_throughput import build_table, ranks_table, run_build, run_ranks
from ..speed.inference import run, table
from ..speed.realistic import parse_format, run_shape, shape_table
from ..speed.shapes import SHAPES
from .options import COUNT, NEW_FILE, choice_option, command, parse_skip


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated counts >= 1, got {text!r}")
    return values


@command()
@click.option("--hidden", type=COUNT, default=1024, show_default=True)
@choice_option(
    "--shape",
    sorted(SHAPES),
    "A real model's shape (4-bit, random weights, --layers of its layers) with memories "
    "sized like a real build: bytes, speed ratios and recall per --formats and --searches.",
)
@click.option("--layers", type=COUNT, help="Layers (default 8; 2 with --shape).")
@click.option("--examples", type=COUNT, default=1000, show_default=True, help="With --shape.")
@click.option("--tokens-per-example", type=COUNT, default=150, show_default=True)
@click.option(
    "--formats",
    default="int8-pca8",
    show_default=True,
    help="With --shape: key formats (float16, bfloat16, int8), -pcaN for PCA to d/N, -topM "
    "for values of the top M experts only (int8-pca16-top8).",
)
@click.option(
    "--nprobe", type=COUNT, default=8, show_default=True, help="Lists an ivf search reads."
)
@click.option("--experts", type=COUNT, default=32, show_default=True)
@click.option("--top-k", type=COUNT, default=4, show_default=True)
@click.option("--vocab", type=COUNT, default=8192, show_default=True)
@click.option("--sizes", default="10000,100000", show_default=True, help="Entries per layer.")
@click.option("--searches", help="Default exact,hnsw; ivf,exact with --shape.")
@click.option("--mix", default="topk", show_default=True)
@click.option(
    "--skip-confident",
    "skip",
    callback=parse_skip,
    metavar="SIGNAL:T",
    help="Selective retrieval (entropy:T or margin:T), to measure its speed effect.",
)
@click.option("--prompt-tokens", type=COUNT, help="Default 256; 64 with --shape.")
@click.option(
    "--generation-tokens",
    "--gen-tokens",
    "gen_tokens",
    type=COUNT,
    help="Default 64; 16 with --shape.",
)
@click.option("--num-trials", "--repeats", "repeats", type=COUNT, default=3, show_default=True)
@click.option("--quick", is_flag=True, help="A small model and memories: a one-minute check.")
@click.option(
    "--build-ranks",
    metavar="N,M",
    help="Time a whole build_memory run with each number of data-parallel ranks.",
)
@click.option(
    "--build",
    is_flag=True,
    help="Measure memory-build throughput against the forward pass instead of inference.",
)
@click.option(
    "--server",
    is_flag=True,
    help="Requests/s of mlx_knnmoe.server against plain mlx_lm.server instead (memory size: "
    "the first of --sizes; tokens per request: --generation-tokens).",
)
@click.option("--requests", type=COUNT, default=48, show_default=True, help="With --server.")
@click.option("--concurrency", type=COUNT, default=4, show_default=True, help="With --server.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Keep memories and hnswlib indexes here between runs.",
)
@click.option("--output", type=NEW_FILE, help="Write rows as JSON.")
def cli(
    quick: bool,
    build: bool,
    build_ranks,
    server: bool,
    requests: int,
    concurrency: int,
    sizes: str,
    searches: str,
    workdir,
    output,
    shape,
    examples,
    tokens_per_example,
    formats,
    nprobe,
    **kw,
) -> None:
    """Decode and prefill tokens/s with memories, as ratios to the plain model in the same run."""
    if shape is not None:
        try:
            [parse_format(f) for f in formats.split(",")]
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--formats") from None
        settings = dict(
            shape=shape,
            layers=kw["layers"] or 2,
            examples=examples,
            tokens_per_example=tokens_per_example,
            formats=tuple(formats.split(",")),
            searches=tuple((searches or "ivf,exact").split(",")),
            nprobe=nprobe,
            prompt_tokens=kw["prompt_tokens"] or 64,
            gen_tokens=kw["gen_tokens"] or 16,
            repeats=kw["repeats"],
        )
        rows = run_shape(**settings, log=lambda m: click.echo(m, err=True))
        click.echo(shape_table(rows))
        if output:
            Path(output).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        return
    kw.update(
        layers=kw["layers"] or 8,
        prompt_tokens=kw["prompt_tokens"] or 256,
        gen_tokens=kw["gen_tokens"] or 64,
    )
    searches = searches or "exact,hnsw"
    given = {k: kw.pop(k) for k in ("hidden", "layers", "experts", "top_k", "vocab")}
    model_size = QUICK if quick else BenchModel(**given)
    if server:
        rows = server_throughput.run(
            model_size,
            size=_ints(sizes)[0] if not quick else 2000,
            requests=requests,
            concurrency=concurrency,
            gen_tokens=kw["gen_tokens"],
            repeats=kw["repeats"],
            log=lambda m: click.echo(m, err=True),
        )
        click.echo(server_throughput.table(rows))
        if output:
            settings = asdict(model_size)
            Path(output).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        return
    if build_ranks:
        wd = Path(workdir or "benchmark-ranks")
        wd.mkdir(parents=True, exist_ok=True)
        rows = run_ranks(_ints(build_ranks), wd, model_size, log=lambda m: click.echo(m, err=True))
        click.echo(ranks_table(rows))
        return
    if build:
        rows = run_build(model_size, log=lambda m: click.echo(m, err=True))
        click.echo(build_table(rows))
        if output:
            settings = asdict(model_size)
            Path(output).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        return
    if quick:
        kw.update(prompt_tokens=128, gen_tokens=32, repeats=2)
        sizes = "2000,20000"
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    rows = run(
        model_size,
        sizes=_ints(sizes),
        searches=tuple(searches.split(",")),
        workdir=workdir,
        log=lambda m: click.echo(m, err=True),
        **kw,
    )
    click.echo(table(rows))
    if output:
        settings = {**asdict(model_size), **kw}
        Path(output).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


main = cli

if __name__ == "__main__":
    main()
