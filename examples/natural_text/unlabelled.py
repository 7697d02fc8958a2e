"""Memories from unlabelled data (``build_memory --pseudo-labels``) against gold labels, on
the bundled and the natural-text benchmark (run.py's benches, scoring and table cells).

    python examples/natural_text/unlabelled.py --bench bundled   # ~25 min on 2 busy cores
    python examples/natural_text/unlabelled.py --bench natural   # ~50 min
    python examples/natural_text/unlabelled.py --report-only     # both sections from the
                                                                 # results files

Bundled: the shifted reference split's prompts without their completions, answered (4
tokens: the answer is always 4 letters, " l n s j"; the model never emits an end token, so
a longer limit adds a continuation past the answer) by the model itself, or by a teacher: the model
fully fine-tuned on the reference split with its gold completions
(``examples/reproduce/baselines.py``'s ``full`` baseline, saved to a folder and loaded by
path as ``--teacher`` is). Natural text: each reference chunk split at the line boundary
nearest its middle; the gold row builds from first half -> second half (the second half's
tokens are the targets), the pseudo-label row from first half -> the model's greedy
continuation (``--pseudo-max-tokens`` 40, about a second half). Every memory is built with
the defaults (re-capture 1, calibrated) and exact search, and scored as run.py scores (paired
bootstrap 95% intervals over examples against the plain model). Rows are cached in
``results_unlabelled_<bench>.json``; ``--only`` reruns the rows named.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reproduce"))  # baselines.py (fine-tuning)
sys.path.insert(0, str(HERE))  # run.py (benches, scoring), ahead of reproduce/run.py

import baselines  # noqa: E402
import run as bench_run  # noqa: E402
from mlx_lm import load  # noqa: E402

from mlx_knnmoe import BuildConfig  # noqa: E402
from mlx_knnmoe.build.pseudo_labels import pseudo_label_dataset  # noqa: E402
from mlx_knnmoe.data.examples import Dataset, encode_pair, load_dataset  # noqa: E402
from mlx_knnmoe.evaluation.bootstrap import perplexity  # noqa: E402

MARK = "unlabelled-{}"  # the EXPERIMENTS.md section: <!-- unlabelled-<bench>: begin/end -->
MAX_TOKENS = {"bundled": 4, "natural": 40}
MAX_SEQ_LEN = 256  # as run.py's Bench.load


def halves(text: str) -> tuple[str, str]:
    """A chunk split at the line boundary nearest its middle (by characters); a one-line
    chunk is split at the whitespace nearest its middle."""
    lines = text.splitlines(keepends=True)
    if len(lines) > 1:
        ends = [sum(map(len, lines[: i + 1])) for i in range(len(lines) - 1)]
        cut = min(ends, key=lambda e: abs(e - len(text) / 2))
    else:
        spaces = [i for i, c in enumerate(text) if c.isspace() and 0 < i < len(text) - 1]
        cut = min(spaces, key=lambda i: abs(i - len(text) / 2)) if spaces else len(text) // 2
    return text[:cut], text[cut:]


def write_halves(reference: Path, out: Path) -> list[dict]:
    """The reference chunks as prompt (first half) / completion (second half) records."""
    records = []
    for line in reference.read_text().splitlines():
        prompt, completion = halves(json.loads(line)["text"])
        if prompt.strip() and completion.strip():
            records.append({"prompt": prompt, "completion": completion})
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def agreement(tokenizer, gold_path: Path, dataset: Dataset) -> float:
    """Share of the generated answer tokens equal to the gold completion's token at the same
    place (tokens past the gold answer's end count as different)."""
    gold = {}
    with open(gold_path) as f:
        for i, line in enumerate(f, 1):
            r = json.loads(line)
            gold[f"{gold_path}:{i}"] = encode_pair(tokenizer, r["prompt"], r["completion"])[1]
    same = total = 0
    for e in dataset.examples:
        answer = [t for t, m in zip(e.tokens, e.loss_mask) if m]
        want = gold[e.source]
        same += sum(a == b for a, b in zip(answer, want))
        total += len(answer)
    return same / max(total, 1)


def fine_tuned_teacher(model_dir: Path, reference: Path, out: Path) -> float:
    """baselines.py's full fine-tuning on ``reference``, saved as a model folder at ``out``;
    returns the training seconds."""
    model, tokenizer = load(str(model_dir))
    res = baselines.finetune(model, tokenizer, reference, "full", seed=0)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    for old in out.glob("*.safetensors*"):
        old.unlink()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return res["seconds"]


def pseudo_row(model, tokenizer, splits, plain, name, prompts, gold, teacher_dir, max_tokens):
    """Generate the answers (by the model, or the teacher at ``teacher_dir``), then build and
    score as run.py does."""
    settings = {"pseudo_labels": True, "pseudo_max_tokens": max_tokens, "format": "completion"}
    if teacher_dir is not None:
        settings["teacher"] = str(teacher_dir)
    config = BuildConfig(max_seq_len=MAX_SEQ_LEN, **settings)
    teacher = load(str(teacher_dir)) if teacher_dir is not None else None
    dataset, info = pseudo_label_dataset(model, tokenizer, prompts, config, teacher)
    settings["max_seq_len"] = MAX_SEQ_LEN
    row, _ = bench_run.run_variant(model, tokenizer, splits, plain, name, settings, dataset)
    row["generation_seconds"] = info["seconds"]
    row["agreement"] = agreement(tokenizer, gold, dataset)
    row["targets"] = dataset.num_targets()
    return row


def gold_row(model, tokenizer, splits, plain, name, gold):
    dataset = load_dataset(gold, tokenizer, "completion", max_seq_len=MAX_SEQ_LEN)
    row, _ = bench_run.run_variant(model, tokenizer, splits, plain, name, {}, dataset)
    row["targets"] = dataset.num_targets()
    return row


def open_bench(bench_name: str, path: Path, scorer) -> tuple:
    """The results so far (the file at ``path``, with the bench's title, tests, sizes and
    plain perplexities), the bench, its model and tokenizer, its splits, and the plain
    model's ``scorer(model, dataset)`` on each test split."""
    results = json.loads(path.read_text()) if path.exists() else {}
    bench = bench_run.BENCHES[bench_name]
    model, tokenizer = load(str(bench.model))
    splits = bench.load(tokenizer, MAX_SEQ_LEN)
    plain = {t: scorer(model, splits[t]) for t in bench.tests}
    results.update(
        title=bench.title,
        tests=list(bench.tests),
        sizes={name: len(d.examples) for name, d in splits.items()},
        plain={t: perplexity(s) for t, s in plain.items()},
    )
    results.setdefault("rows", {})
    return results, bench, model, tokenizer, splits, plain


def run(bench_name: str, path: Path, only: list[str] | None, workdir: Path) -> dict:
    """Run the bench's rows not yet in the results file at ``path`` (or those in ``only``),
    saving the file after each row."""
    results, bench, model, tokenizer, splits, plain = open_bench(bench_name, path, bench_run.score)
    rows = results["rows"]
    tokens = MAX_TOKENS[bench_name]
    reference = bench.data / f"{bench.reference}.jsonl"
    if bench_name == "natural":
        gold = workdir / "shifted_reference_halves.jsonl"
        write_halves(reference, gold)
    else:
        gold = reference

    def wanted(name: str) -> bool:
        path.write_text(json.dumps(results, indent=1))  # the rows so far
        return (only is None and name not in rows) or (only is not None and name in only)

    args = (model, tokenizer, splits, plain)
    if wanted("gold"):
        rows["gold"] = gold_row(*args, "gold", gold)
    if wanted("pseudo, model"):
        rows["pseudo, model"] = pseudo_row(*args, "pseudo, model", gold, gold, None, tokens)
    if bench_name == "bundled" and wanted("pseudo, teacher"):
        teacher = workdir / "teacher"
        seconds = fine_tuned_teacher(bench.model, reference, teacher)
        row = pseudo_row(*args, "pseudo, teacher", gold, gold, teacher, tokens)
        row["teacher_seconds"] = round(seconds, 1)
        row["settings"]["teacher"] = "full fine-tuning of the model on the reference split"
        rows["pseudo, teacher"] = row
    path.write_text(json.dumps(results, indent=1))
    return results


DESCRIPTIONS = {
    "bundled": {
        "gold": "gold labels: the reference split as it is",
        "pseudo, model": "pseudo-labels: its prompts answered by the model itself",
        "pseudo, teacher": "pseudo-labels: answered by the teacher (full fine-tuning on the "
        "reference split, saved, loaded by path)",
    },
    "natural": {
        "gold": "gold labels: first half of each reference chunk -> its second half",
        "pseudo, model": "pseudo-labels: first half -> the model's greedy continuation",
    },
}


def _length(row: dict) -> str:
    tokens = row["settings"].get("pseudo_max_tokens")
    return f", answers of at most {tokens} tokens" if tokens else ""


def table_head(mark: str, title: str, command: str, results: dict, what: str, columns) -> list:
    """A section's first lines: begin mark, title, the command and sizes, ``what`` the table
    shows, the header of ``columns`` (first: the row name), and the plain model's row with
    its two test perplexities in the columns named ``shifted test ppl`` and ``original``."""
    p, tests = results["plain"], results["tests"]
    plain = [{"shifted test ppl": f"{p[tests[0]]:.2f}", "original test ppl": f"{p[tests[1]]:.2f}"}
             .get(c, "") for c in columns[1:]]  # fmt: skip
    sizes = ", ".join(f"{k} {v} examples" for k, v in results["sizes"].items())
    return [
        bench_run.MARK.format(mark, "begin"),
        f"### {title}",
        "",
        f"Made by `{command}` (sizes: {sizes}). {what}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        "| plain | " + " | ".join(plain) + " |",
    ]


def report(bench: str, results: dict) -> str:
    shifted, original = results["tests"]
    what = (
        "Perplexity on the test splits, difference to the plain model with a paired bootstrap "
        "95% interval over examples; lambda: mean per MoE layer on the shifted split's first 20 "
        "examples. Agreement: share of the generated answer tokens equal to the gold "
        "completion's token at the same place (tokens past the gold answer's end count as "
        "different). Every memory with the build defaults (re-capture 1, calibrated), exact "
        "search."
    )
    columns = ["memory", "agreement with gold", "shifted test ppl", "original test ppl"]
    columns += ["lambda per layer (shifted)", "eta", "answers s", "build s"]
    lines = table_head(
        MARK.format(bench),
        f"Memories from unlabelled data: {results['title']}",
        f"python examples/natural_text/unlabelled.py --bench {bench}",
        results,
        what,
        columns,
    )
    for name, r in results["rows"].items():
        s, o = r["splits"][shifted], r["splits"][original]
        agree = f"{r['agreement']:.1%}" if "agreement" in r else "(gold)"
        teacher = r.get("teacher_seconds")
        extra = f" + {teacher:.0f} s teacher training" if teacher else ""
        lines.append(
            f"| {DESCRIPTIONS[bench].get(name, name)}{_length(r)}{bench_run._scales(r)} "
            f"| {agree} "
            f"| {bench_run._ci(s)} | {bench_run._ci(o)} | {bench_run._lambdas(s)} "
            f"| {r['eta']:g} | {r.get('generation_seconds', 0):.0f}{extra} "
            f"| {r['build_seconds']:.0f} |"
        )
    lines += ["", bench_run.MARK.format(MARK.format(bench), "end")]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", choices=sorted(bench_run.BENCHES), default="bundled")
    ap.add_argument("--report", default=str(bench_run.ROOT / "EXPERIMENTS.md"))
    ap.add_argument("--only", nargs="*", default=None, help="rows to (re)run")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    benches = sorted(bench_run.BENCHES) if args.report_only else [args.bench]
    for bench in benches:
        path = HERE / f"results_unlabelled_{bench}.json"
        if not args.report_only:
            with tempfile.TemporaryDirectory() as tmp:
                run(bench, path, args.only, Path(tmp))
        results = json.loads(path.read_text()) if path.exists() else {}
        if not results.get("rows"):
            continue
        section = report(bench, results)
        bench_run.write_section(Path(args.report), MARK.format(bench), section)
        print(section)


if __name__ == "__main__":
    sys.exit(main())
