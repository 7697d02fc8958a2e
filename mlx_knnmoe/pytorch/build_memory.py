"""``python -m mlx_knnmoe.pytorch.build_memory``: build a memory with PyTorch (CPU or CUDA)
from a transformers checkpoint; the file loads in MLX (``mlx_knnmoe.generate --memory``).
The flags are those of ``mlx_knnmoe.build_memory`` (without appending, resuming, ranks,
pseudo-labels, budget and value formats) plus ``--device`` and ``--dtype``.

    python -m mlx_knnmoe.pytorch.build_memory --model allenai/OLMoE-1B-7B-0125-Instruct \\
        --data medmcqa_train.jsonl --format medmcqa --out med.st --device cuda
"""

from __future__ import annotations

import click

from ..commands.build_options import (
    REFINE_FIELDS,
    build_options,
    build_settings,
    refine_options,
    summary,
)
from ..commands.options import choice_option, command, knn_overrides
from ..config import BuildConfig, KNNConfig
from .loading import DTYPES, load_model
from .pipeline import build_memory


@command()
@build_options
@refine_options
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@choice_option("--dtype", sorted(DTYPES), "Default: the checkpoint's.")
def cli(**kw) -> None:
    """Build a kNN-MoE memory with PyTorch from a transformers checkpoint."""
    if kw["out"] is None:
        raise click.UsageError("give --out")
    retrieval = KNNConfig().updated(**knn_overrides(kw))
    own = {k: kw.pop(k) for k in REFINE_FIELDS}
    settings = build_settings(kw) | {k: v for k, v in own.items() if v is not None}
    config = BuildConfig(**settings)
    model, tokenizer = load_model(kw["model"], kw["device"], kw["dtype"])
    memory = build_memory(
        model,
        tokenizer,
        kw["data"],
        config,
        retrieval=retrieval,
        out=kw["out"],
        force=kw["force"],
        progress=not kw["quiet"],
    )
    click.echo(summary(memory))


main = cli

if __name__ == "__main__":
    main()
