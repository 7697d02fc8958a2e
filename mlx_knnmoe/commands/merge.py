"""``mlx_knnmoe.merge``: join memories built for the same model (memory/merging.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..memory.merging import merge_memories
from ..memory.store import Memory
from .options import EXISTING_FILE, NEW_FILE, command


@command()
@click.argument("memories", nargs=-1, required=True, type=EXISTING_FILE)
@click.option("--out", required=True, type=NEW_FILE)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def cli(memories: tuple[str, ...], out: str, force: bool) -> None:
    """Join memories built for the same model into one file (entries in argument order)."""
    if len(memories) < 2:
        raise click.UsageError("give at least two memories to merge")
    if Path(out).exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite it")
    merged = merge_memories([Memory.load(p) for p in memories], list(memories))
    merged.save(out, force=force)
    n = merged.num_entries()[merged.layers[0]]
    click.echo(
        f"wrote {out}: {n} entries x {len(merged.layers)} MoE layers from {len(memories)} memories"
    )


main = cli

if __name__ == "__main__":
    main()
