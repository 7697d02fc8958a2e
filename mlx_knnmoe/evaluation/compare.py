"""The plain model and each memory on the same examples, side by side.

Multiple-choice data: accuracy by the log-likelihood of the answer letters (acc, and acc_norm
with lm-evaluation-harness's length normalisation). Text data: perplexity of the target
tokens. Differences to the plain model carry paired bootstrap 95% intervals, and a breakdown
by the plain model's perplexity of each prompt shows where the memory helps (the paper's
analysis).
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from ..data.formats import MC_FORMATS, detect_format, multiple_choice
from ..data.records import DataError, read_records
from ..retrieval.attach import attach, detach, knn_stats, set_stats
from .bootstrap import buckets, mean_of, paired_bootstrap, perplexity
from .scoring import score_choices, score_text


def load_items(path, fmt: str, seed: int, max_examples: int | None):
    """Multiple-choice items in file order, or None when the data is not multiple choice."""
    records = list(itertools.islice(read_records(path), max_examples))  # stops reading there
    if not records:
        raise DataError(f"{path}: no examples")
    fmt = detect_format(records[0][1]) if fmt == "auto" else fmt
    if fmt not in MC_FORMATS:
        return fmt, None
    items = []
    for source, record in records:
        try:
            items.append(multiple_choice(record, fmt, seed))
        except ValueError as e:
            raise DataError(f"{source}: {e}") from e
    return fmt, items


def evaluate_variant(model, tokenizer, items, examples, batch_tokens: int) -> dict:
    """Per-example arrays for one variant of the model (memory attached or not)."""
    set_stats(model)
    if items is not None:
        s = score_choices(model, tokenizer, items, batch_tokens)
        arrays = {"acc": s.acc, "acc_norm": s.acc_norm, "prompt_nll": s.prompt_nll}
    else:
        nll, targets = score_text(model, examples, batch_tokens)
        arrays = {"nll": nll, "targets": targets, "prompt_nll": nll / np.maximum(targets, 1)}
    stats = knn_stats(model)
    set_stats(model, False)
    return {"arrays": arrays, "routing": _routing_summary(stats)}


def score_variants(model, tokenizer, items, examples, variants, batch_tokens: int) -> dict:
    """``evaluate_variant`` for each (name, memory or None, config) of ``variants`` on the same
    examples, its memory attached for its turn only; each result gains its ``seconds``."""
    results = {}
    for name, memory, config in variants:
        if memory is not None:
            attach(model, memory, config)
        tic = time.perf_counter()
        try:
            results[name] = evaluate_variant(model, tokenizer, items, examples, batch_tokens)
        finally:
            detach(model)
        results[name]["seconds"] = time.perf_counter() - tic
    return results


def _routing_summary(stats: dict) -> dict | None:
    if not stats:
        return None
    return {
        "mean_lambda": float(np.mean([s["mean_lambda"] for s in stats.values()])),
        "changed_share": float(np.mean([s["changed_share"] for s in stats.values()])),
    }


def compare(results: dict, mc: bool, samples: int, seed: int, n_buckets: int) -> dict:
    """Metrics, paired bootstrap differences to ``plain`` and the perplexity-bucket table."""
    metrics = (
        {"acc": mean_of("acc"), "acc_norm": mean_of("acc_norm")} if mc else {"ppl": perplexity}
    )
    base = results["plain"]["arrays"]
    out = {"variants": [], "buckets": []}
    for name, res in results.items():
        a = res["arrays"]
        row = {"name": name, "routing": res["routing"], "memory": res.get("memory")}
        row.update(config=res.get("config"), seconds=res["seconds"])
        row.update({m: fn(a) for m, fn in metrics.items()})
        if name != "plain":
            row["vs_plain"] = {
                m: paired_bootstrap(fn, _data(base, mc), _data(a, mc), samples, seed)
                for m, fn in metrics.items()
            }
        out["variants"].append(row)
    which, ranges = buckets(np.exp(base["prompt_nll"]), n_buckets)
    main = "acc" if mc else "ppl"
    for b, (lo, hi) in enumerate(ranges):
        sel = which == b
        entry = {"ppl_range": [lo, hi], "examples": int(sel.sum()), main: {}}
        for name, res in results.items():
            entry[main][name] = metrics[main](
                {k: v[sel] for k, v in _data(res["arrays"], mc).items()}
            )
        out["buckets"].append(entry)
    return out


def _data(arrays: dict, mc: bool) -> dict:
    keys = ("acc", "acc_norm") if mc else ("nll", "targets")
    return {k: arrays[k] for k in keys}


def table(summary: dict, mc: bool) -> str:
    metrics = ("acc", "acc_norm") if mc else ("ppl",)
    head = ["variant", *(h for m in metrics for h in (m, "diff [95% CI]"))]
    rows = [head + ["lambda", "changed", "time s"]]
    for row in summary["variants"]:
        cells = [row["name"]]
        for m in metrics:
            d = row.get("vs_plain", {}).get(m)
            diff = f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else ""
            cells += [f"{row[m]:.4f}", diff]
        r = row["routing"]
        cells += [f"{r['mean_lambda']:.3f}", f"{r['changed_share']:.1%}"] if r else ["", ""]
        rows.append(cells + [f"{row['seconds']:.1f}"])
    main = metrics[0]
    names = [row["name"] for row in summary["variants"]]
    bucket_rows = [["ppl range", "n", *names]]
    for b in summary["buckets"]:
        lo, hi = b["ppl_range"]
        cells = [f"{b[main][n]:.4f}" for n in names]
        bucket_rows.append([f"{lo:.1f}-{hi:.1f}", str(b["examples"]), *cells])
    caption = f"{main} by the plain model's prompt perplexity:"
    return "\n".join([*aligned(rows), "", caption, *aligned(bucket_rows)])


def aligned(rows: list[list[str]], left: int = 1) -> list[str]:
    """Rows as lines, each column as wide as its widest cell, two spaces apart; the first
    ``left`` columns (names) left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]


def plot(summary: dict, mc: bool, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'mlx_knnmoe[plot]'") from e
    main = "acc" if mc else "ppl"
    names = [row["name"] for row in summary["variants"]]
    labels = [f"{lo:.1f}-{hi:.1f}" for lo, hi in (b["ppl_range"] for b in summary["buckets"])]
    x = np.arange(len(labels))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 3.5))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [b[main][name] for b in summary["buckets"]], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, labels)
    ax.set_xlabel("zero-shot prompt perplexity (plain model), quantile buckets")
    ax.set_ylabel(main)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
