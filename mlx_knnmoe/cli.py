"""``mlx_knnmoe <command>``: one entry point for every tool."""

import click

from .benchmark import cli as benchmark_cli
from .build_cli import cli as build_memory_cli
from .chat import cli as chat_cli
from .convert import cli as convert_cli
from .demo import main as demo_cli
from .evaluate import cli as evaluate_cli
from .generate import cli as generate_cli
from .merge import cli as merge_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kNN-MoE retrieval-augmented routing for MLX MoE models."""


main.add_command(demo_cli, "demo")
main.add_command(generate_cli, "generate")
main.add_command(chat_cli, "chat")
main.add_command(build_memory_cli, "build_memory")
main.add_command(evaluate_cli, "evaluate")
main.add_command(merge_cli, "merge")
main.add_command(convert_cli, "convert")
main.add_command(benchmark_cli, "benchmark")

if __name__ == "__main__":
    main()
