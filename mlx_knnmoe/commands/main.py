"""``mlx_knnmoe <command>``: one entry point for every tool; each command's module is imported
only when that command runs."""

from __future__ import annotations

import importlib

import click

from ..scripts import COMMANDS
from .options import CONTEXT, verbose_option


class LazyGroup(click.Group):
    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"mlx_knnmoe.commands.{name}").cli


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@verbose_option
def main() -> None:
    """kNN-MoE retrieval-augmented routing for MLX MoE models."""


if __name__ == "__main__":
    main()
