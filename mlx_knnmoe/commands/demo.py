"""``mlx_knnmoe.demo``: kNN-MoE on the bundled model, end to end, offline
(evaluation/bundled_demo.py does the work)."""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from ..bundled import DATA_DIR as BUNDLED_DATA
from ..bundled import MODEL_DIR as BUNDLED_MODEL
from ..evaluation.bundled_demo import result_table, run_demo, verdict
from .build_options import parse_eta
from .options import COUNT, EXISTING_DIR, command


@command()
@click.option("--model", default=str(BUNDLED_MODEL), show_default="the bundled model")
@click.option(
    "--data",
    default=str(BUNDLED_DATA),
    type=EXISTING_DIR,
    show_default="the bundled splits",
    help="Directory with shift_ref_*, shift_test_* and orig_test_* splits.",
)
@click.option("--ref-examples", type=COUNT, help="Use only N reference examples.")
@click.option("--test-examples", type=COUNT, help="Score only N test examples.")
@click.option(
    "--eta",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: parse_eta(value),
    help="Step size, or auto.",
)
@click.option("--save-memory", help="Also write the memory to this file.")
@click.option("--force", is_flag=True, help="Overwrite --save-memory if it exists.")
@click.option("--seed", type=int, default=0, show_default=True)
def cli(**kw) -> None:
    """Build a memory on the bundled model's shifted domain and show what it changes."""
    if kw["save_memory"] and Path(kw["save_memory"]).exists() and not kw["force"]:
        raise click.ClickException(f"{kw['save_memory']} exists; pass --force to overwrite it")
    mx.random.seed(kw["seed"])
    np.random.seed(kw["seed"])
    result = run_demo(
        kw["model"],
        kw["data"],
        ref_examples=kw["ref_examples"],
        test_examples=kw["test_examples"],
        eta=kw["eta"],
        seed=kw["seed"],
        save_memory=kw["save_memory"],
    )
    click.echo("\n" + result_table(result["scores"]))
    click.echo("(ppl: perplexity of the answer tokens, lower is better; acc: 4-way choice)")
    click.echo("kNN-MoE vs plain, paired bootstrap 95% interval:\n" + verdict(result["scores"]))
    s = result["sample"]
    click.echo("\nfirst shifted test prompt the plain model answers wrongly (greedy):")
    click.echo(f"prompt  {s['prompt']!r}   gold {s['gold']!r}")
    click.echo(f"plain   {s['plain']!r}\nkNN-MoE {s['knn']!r}")
    click.echo(f"\ndemo finished in {result['seconds']:.0f}s")


main = cli

if __name__ == "__main__":
    main()
