"""mlx_knnmoe.generate: mlx-lm generation with a kNN-MoE memory attached."""

from __future__ import annotations

import sys

import click
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from ..retrieval.attach import knn_stats, set_stats
from .options import command, generation_options, has_chat_template, start_generation, stats_table


def build_prompt(tokenizer, prompt: str, system_prompt: str | None, ignore_chat_template: bool):
    if ignore_chat_template or not has_chat_template(tokenizer):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@command()
@generation_options(max_tokens=100, seed=None, max_kv_size=None, kv_help="Rotating KV cache size.")
@click.option("--prompt", "-p", default="Hello", show_default=True, help="Prompt; '-' reads stdin.")
@click.option("--system-prompt", help="System prompt for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt as is.")
@click.option(
    "--knn-stats", is_flag=True, help="Print mean lambda and changed-expert share per layer."
)
@click.option("--quiet", is_flag=True, help="Do not print speed after generating.")
def cli(**kw) -> None:
    """Generate text with a kNN-MoE memory (mlx-lm's flags plus the retrieval ones)."""

    model, tokenizer, config = start_generation(kw)
    prompt = sys.stdin.read() if kw["prompt"] == "-" else kw["prompt"]
    prompt = build_prompt(tokenizer, prompt, kw["system_prompt"], kw["ignore_chat_template"])
    sampler = make_sampler(kw["temp"], kw["top_p"], kw["min_p"], top_k=kw["top_k"])
    if kw["knn_stats"]:
        if config is None:
            raise click.UsageError("--knn-stats needs --memory")
        set_stats(model)
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=kw["max_tokens"],
        sampler=sampler,
        max_kv_size=kw["max_kv_size"],
    ):
        click.echo(response.text, nl=False)
    click.echo()
    if not kw["quiet"] and response is not None:
        click.echo("=" * 10, err=True)
        click.echo(
            f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
            err=True,
        )
        click.echo(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec",
            err=True,
        )
        click.echo(f"Peak memory: {response.peak_memory:.3f} GB", err=True)
        if config is not None:
            click.echo(
                f"kNN-MoE: k={config.k} {config.similarity} mix={config.mix} "
                f"lambda_scale={config.lambda_scale} search={config.search}",
                err=True,
            )
    if kw["knn_stats"]:
        click.echo(stats_table(knn_stats(model)))


main = cli

if __name__ == "__main__":
    main()
