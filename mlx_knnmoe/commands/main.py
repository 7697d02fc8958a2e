"""``mlx_knnmoe <command>``: one entry point for every tool; each command's module is imported
only when that command runs."""

from __future__ import annotations

import importlib

import click

from .options import CONTEXT

COMMANDS = {
    "demo": "Build a memory on the bundled model and show what it changes.",
    "generate": "Generate text with a kNN-MoE memory.",
    "chat": "Chat with a model and a kNN-MoE memory.",
    "build_memory": "Build a kNN-MoE memory from a local dataset.",
    "evaluate": "Score the plain model and each memory side by side.",
    "merge": "Join memories built for the same model.",
    "convert": "Convert a Hugging Face MoE checkpoint to MLX.",
    "compress_memory": "Compress a memory (key precision, PCA, pruning).",
    "benchmark": "Speed with a memory, as ratios to plain mlx-lm.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"mlx_knnmoe.commands.{name}").cli


@click.group(cls=LazyGroup, context_settings=CONTEXT)
def main() -> None:
    """kNN-MoE retrieval-augmented routing for MLX MoE models."""


if __name__ == "__main__":
    main()
