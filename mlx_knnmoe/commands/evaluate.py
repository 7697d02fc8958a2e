"""``mlx_knnmoe.evaluate``: the plain model and each memory on the same examples, side by side
(evaluation/compare.py does the work), or on lm-evaluation-harness tasks with ``--tasks``
(evaluation/harness.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from ..atomic_files import atomic_write
from ..config import KNNConfig
from ..data.examples import load_dataset
from ..evaluation.compare import compare, load_items, plot, score_variants, table
from ..loading import load_memory, memory_name
from .options import (
    BATCH_TOKENS,
    COUNT,
    EXISTING_DIR,
    EXISTING_FILE,
    FORMAT,
    MODEL,
    NEW_FILE,
    NON_NEGATIVE,
    command,
    force_option,
    knn_overrides,
    limit_option,
    max_seq_length_option,
    named_memories_option,
    retrieval_options,
)


@command()
@MODEL
@click.option(
    "--data",
    type=EXISTING_FILE,
    help="A local dataset file (this or --tasks).",
)
@click.option(
    "--tasks",
    metavar="T1,T2",
    help="lm-evaluation-harness tasks instead of --data (pip install 'mlx_knnmoe[eval]').",
)
@click.option(
    "--include-path",
    type=EXISTING_DIR,
    help="With --tasks: a folder of lm-eval task YAML files.",
)
@click.option("--num-fewshot", type=NON_NEGATIVE, help="With --tasks: lm-eval's shots.")
@click.option(
    "--apply-chat-template/--no-apply-chat-template",
    default=None,
    help="With --tasks: render prompts with the chat template (default: if the tokenizer has one).",
)
@FORMAT
@named_memories_option(
    "memory",
    "A memory (file, packaged NAME or repo_id:file), shown as NAME or by its file; "
    "repeat to compare several.",
)
@retrieval_options
@limit_option("Score at most this many examples.")
@max_seq_length_option(2048)
@BATCH_TOKENS
@click.option("--bootstrap", "samples", type=COUNT, default=1000, show_default=True)
@click.option("--buckets", "n_buckets", type=COUNT, default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=NEW_FILE, help="JSON results.")
@click.option("--plot", "plot_path", type=NEW_FILE)
@force_option("--output / --plot")
def cli(**kw) -> None:
    """Accuracy or perplexity of the plain model and each --memory (repeatable), side by side.

    With --skip-confident, each memory is evaluated with and without selective retrieval.
    """
    from mlx_lm import load

    overrides = knn_overrides(kw)
    skip = {k: overrides.pop(k) for k in ("skip", "skip_threshold")}
    for path in (kw["output"], kw["plot_path"]):
        if path and Path(path).exists() and not kw["force"]:
            raise click.ClickException(f"{path} exists; pass --force to overwrite it")
    if (kw["data"] is None) == (kw["tasks"] is None):
        raise click.UsageError("give either --data (a local file) or --tasks (lm-eval tasks)")
    if kw["tasks"] is not None:
        return _lm_eval(kw, overrides, skip)
    model, tokenizer = load(kw["model"])
    fmt, items = load_items(kw["data"], kw["fmt"], kw["seed"], kw["max_examples"])
    examples = None
    if items is None:
        examples = load_dataset(
            kw["data"], tokenizer, fmt, kw["max_examples"], kw["max_seq_len"], shuffle=False
        ).examples
    variants = _variants(kw, overrides, skip)
    results = score_variants(model, tokenizer, items, examples, variants, kw["batch_tokens"])
    for name, memory, config in variants:
        if memory is not None:
            results[name].update(memory=str(memory.path), config=asdict(config))
    mc = items is not None
    summary = compare(results, mc, kw["samples"], kw["seed"], kw["n_buckets"])
    click.echo(table(summary, mc))
    n = len(items) if mc else len(examples)
    if kw["output"]:
        doc = {"model": kw["model"], "data": kw["data"], "format": fmt, "examples": n}
        doc.update(metric="acc" if mc else "ppl", bootstrap={"samples": kw["samples"]}, **summary)
        _write_json(kw["output"], doc)
    if kw["plot_path"]:
        plot(summary, mc, kw["plot_path"])


def _variants(kw: dict, overrides: dict, skip: dict) -> list:
    """(name, memory, config): the plain model, then each --memory (and with --skip-confident
    each memory again with selective retrieval)."""
    variants = [("plain", None, None)]
    for spec in kw["memory"]:
        name, where = memory_name(spec)
        memory = load_memory(where, kw["model"])
        config = KNNConfig.from_memory_defaults(memory.retrieval, **overrides)
        name = _name(name, variants)
        variants.append((name, memory, config))
        if skip["skip"] is not None:
            variants.append((f"{name}+skip", memory, config.updated(**skip)))
    return variants


def _lm_eval(kw: dict, overrides: dict, skip: dict) -> None:
    try:
        from ..evaluation.harness import KNNMoELM, evaluate_tasks, tables
    except ImportError as e:
        raise ImportError(f"--tasks needs lm-eval: pip install 'mlx_knnmoe[eval]' ({e})") from e
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm = KNNMoELM(kw["model"], use_chat_template=kw["apply_chat_template"])
    results = evaluate_tasks(
        lm,
        [t for t in kw["tasks"].split(",") if t],
        _variants(kw, overrides, skip),
        include_path=kw["include_path"],
        limit=kw["max_examples"],
        num_fewshot=kw["num_fewshot"],
        bootstrap_iters=kw["samples"],
        seed=kw["seed"],
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(tables(results))
    if kw["output"]:
        doc = {"model": kw["model"], "tasks": kw["tasks"], "limit": kw["max_examples"]}
        doc["variants"] = {name: r["results"] for name, r in results.items()}
        _write_json(kw["output"], doc)


def _name(name: str, taken) -> str:
    names = {t[0] for t in taken}
    return name if name not in names else f"{name}#{len(taken)}"


def _write_json(path: str, doc: dict) -> None:
    text = json.dumps(doc, indent=2)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text), force=True, suffix="")


main = cli

if __name__ == "__main__":
    main()
