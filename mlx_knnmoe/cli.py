"""``mlx_knnmoe <command>``: one entry point for every tool."""

import click

from . import benchmark, generate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kNN-MoE retrieval-augmented routing for MLX MoE models."""


main.add_command(generate.cli, "generate")
main.add_command(benchmark.cli, "benchmark")

if __name__ == "__main__":
    main()
