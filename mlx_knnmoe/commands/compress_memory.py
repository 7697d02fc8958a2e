"""``mlx_knnmoe.compress_memory``: smaller memories (key precision, PCA, pruning, top-m values;
memory/compress.py).

mlx_knnmoe.compress_memory med.st med-small.st --keys int8 --pca 256 --prune --model qwen3
"""

from __future__ import annotations

from pathlib import Path

import click
from mlx_lm.utils import load

from ..loading import load_memory, resolve_memory
from ..memory.compress import KEY_FORMATS, VALUE_FORMATS, compress
from ..memory.store import Memory
from .options import COUNT, choice_option, command, force_option

TOP_EXPERTS_HELP = (
    "Keep only each entry's top-M experts' logits (float16 unless --values) and one logit for "
    "the rest that keeps their total score (memory/values.py)."
)


@command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@choice_option("--keys", KEY_FORMATS, "Store keys in this precision (int8: one scale per row).")
@choice_option("--values", VALUE_FORMATS, "Store the optimised logits in this precision.")
@click.option("--top-experts", type=COUNT, metavar="M", help=TOP_EXPERTS_HELP)
@click.option(
    "--ivf",
    type=click.IntRange(min=0),
    metavar="LISTS",
    help="Train an inverted-file index with LISTS lists (0: about 2 sqrt(entries)) and store "
    "it, for --search ivf.",
)
@click.option(
    "--pca",
    type=COUNT,
    metavar="DIM",
    help="Project keys to DIM dimensions (PCA fitted on each layer's keys, stored in the file "
    "and applied to queries; the RBF bandwidth is recalibrated).",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Drop entries whose stored logits pick the same top-k experts as the router (--model).",
)
@click.option(
    "--model",
    help="The model the memory was built with: checks the memory, adds a router probe if it "
    "has none (so a quantised model can later say how far its routers are), needed by --prune.",
)
@force_option("OUT")
def cli(source: str, out: Path, keys, values, top_experts, ivf, pca, prune, model, force) -> None:
    """Compress a memory (SOURCE: a file, a NAME packaged in --model, or repo_id:file)."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to replace it")
    if prune and model is None:
        raise click.UsageError("--prune needs --model (the model the memory was built with)")
    model_obj = load(model, lazy=True)[0] if model else None
    memory = load_memory(source, model) if model else Memory.load(resolve_memory(source))
    formats = dict(keys=keys, pca=pca, values=values, ivf=ivf, top_experts=top_experts)
    small = compress(memory, prune=prune, model=model_obj, **formats)
    small.save(out, force=force)
    click.echo(describe(memory, small))


def describe(before: Memory, after: Memory) -> str:
    """What a compression did: size, entries, PCA variance kept."""
    size = before.path.stat().st_size, after.path.stat().st_size
    lines = [
        f"{before.path} -> {after.path}: {size[0] / 1e6:.2f} MB -> {size[1] / 1e6:.2f} MB "
        f"({size[1] / size[0]:.1%})"
    ]
    for layer in before.layers:
        n = after.num_entries().get(layer, 0)
        line = f"  layer {layer}: {before.num_entries()[layer]} -> {n} entries"
        kept = after.compression.get("pca", {}).get("variance_kept", {}).get(str(layer))
        if kept is not None:
            line += f", PCA {after.keys[layer].shape[1]} dims keep {kept:.1%} of the variance"
        lines.append(line)
    return "\n".join(lines)


main = cli

if __name__ == "__main__":
    main()
