"""Fine-tuning baselines on the natural-text benchmark: router-only, LoRA and full fine-tuning
on the shifted reference chunks, each without and with replay; shifted and original test
perplexity against the plain model (paired bootstrap 95% intervals over chunks) and the
training time.

    python examples/natural_text/fine_tuning.py               # hours on 2 busy cores
    python examples/natural_text/fine_tuning.py --report-only

The training is ``examples/reproduce/baselines.py``'s (``prepare``, ``train``,
``finetune``: Adam, constant learning rate, batches of 32, the mode's learning rate from its
``DEFAULTS``), on text chunks (every token but a chunk's first is a target). Replay mixes in
as many chunks of the model's own training text (``train.txt``: the Python standard library
plus 40 C headers, chunks of about 160 characters spread over it, seed 0) as there are
reference chunks. The learning rate (``LEARNING_RATES``) and the number of epochs are chosen
per row on the shifted held-out split: at each rate training runs for up to ``--epochs``
epochs, scoring the held-out NLL after each and stopping after ``PATIENCE`` epochs without a
new best, and the fewest epochs within ``baselines.TOLERANCE`` nats of the best win; the row
is then trained afresh with that setting (its time) and scored. The original domain is
never looked at while choosing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reproduce"))  # baselines.py (fine-tuning)
sys.path.insert(0, str(HERE))  # run.py and data.py, ahead of reproduce/run.py

import baselines  # noqa: E402
import data as bench_data  # noqa: E402
import run as bench_run  # noqa: E402
from mlx_lm import load  # noqa: E402
from unlabelled import open_bench, table_head  # noqa: E402

from mlx_knnmoe.data.examples import load_dataset  # noqa: E402
from mlx_knnmoe.evaluation.scoring import score_text  # noqa: E402

MARK = "natural-baselines"
CHUNK_CHARS = 160  # as data.py's default
LEARNING_RATES = {  # per mode, around examples/reproduce/baselines.py's tuned DEFAULTS
    "router": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3),
    "full": (3e-5, 1e-4, 3e-4, 1e-3),
}
PATIENCE = 3  # epochs without a new best held-out NLL before the scan stops


def replay_file(data_dir: Path, count: int, out: Path) -> Path:
    """``count`` chunks of the training text, spread over it (seed 0), as a text jsonl."""
    text = (data_dir / "train.txt").read_text()
    chunks = bench_data.chunks_of(text, CHUNK_CHARS, count, random.Random(0))
    bench_data.write_jsonl(out, chunks)
    return out


def choose_epochs(
    model_dir,
    reference,
    replay,
    heldout,
    mode: str,
    epochs: int,
    patience: int = PATIENCE,
    lr: float | None = None,
) -> dict:
    """Train for up to ``epochs`` epochs scoring the held-out NLL after each (epoch 0: before
    training), stopping once ``patience`` epochs in a row are no better than the best so far;
    the fewest epochs, at least 1, within ``baselines.TOLERANCE`` of the best."""
    model, tokenizer = load(str(model_dir))
    examples = load_dataset(reference, tokenizer, "text", shuffle=False).examples
    if replay is not None:
        extra = load_dataset(replay, tokenizer, "text", shuffle=False).examples
        examples = examples + extra[: len(examples)]
    held = load_dataset(heldout, tokenizer, "text", shuffle=False).examples
    cfg = {**baselines.DEFAULTS[mode], **({"lr": lr} if lr is not None else {})}
    per_epoch = -(-len(examples) // cfg["batch_size"])
    baselines.prepare(model, mode, 0)
    scores = [(0, baselines.answer_nll(model, held))]

    def record(step: int) -> bool:
        scores.append((step // per_epoch, baselines.answer_nll(model, held)))
        best_at = min(range(len(scores)), key=lambda i: scores[i][1])
        return len(scores) - 1 - best_at >= patience

    baselines.train(model, examples, epochs * per_epoch, cfg["lr"], cfg["batch_size"], 0,
                    per_epoch, record)  # fmt: skip
    best = min(v for _, v in scores)
    chosen = min(e for e, v in scores if v <= best + baselines.TOLERANCE)
    return {
        "epochs": max(chosen, 1),
        "per_epoch": per_epoch,
        "lr": cfg["lr"],
        "heldout_nll": scores,
    }


def choose_setting(model_dir, reference, replay, heldout, mode: str, epochs: int) -> dict:
    """``choose_epochs`` at each learning rate of ``LEARNING_RATES[mode]``; the fewest epochs
    (at least 1) within ``baselines.TOLERANCE`` of the best held-out NLL over the grid (the
    untrained model's included), else the best trained point."""
    scans = [
        choose_epochs(model_dir, reference, replay, heldout, mode, epochs, lr=lr)
        for lr in LEARNING_RATES[mode]
    ]
    best = min(v for scan in scans for _, v in scan["heldout_nll"])
    trained = [(e, v, scan) for scan in scans for e, v in scan["heldout_nll"] if e >= 1]
    near = [t for t in trained if t[1] <= best + baselines.TOLERANCE]
    epochs_, _, scan = min(near or trained, key=lambda t: (t[0], t[1]) if near else t[1])
    return {
        "epochs": epochs_,
        "per_epoch": scan["per_epoch"],
        "lr": scan["lr"],
        "scans": {str(s["lr"]): s["heldout_nll"] for s in scans},
    }


def run(path: Path, epochs: int, only: list[str] | None) -> dict:
    """Every row not yet in the results file at ``path`` (or those in ``only``), saving the
    file after each."""
    results, bench, _, tokenizer, splits, plain = open_bench("natural", path, _scores)
    rows = results["rows"]
    reference = bench.data / f"{bench.reference}.jsonl"
    heldout = bench.data / "shifted_heldout.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        count = len(splits[bench.reference].examples)
        replay = replay_file(bench.data, count, Path(tmp) / "replay.jsonl")
        for mode in baselines.MODES:
            for mix in (None, replay):
                name = f"{mode}{', replay' if mix else ''}"
                if (only is None and name in rows) or (only is not None and name not in only):
                    continue
                chosen = choose_setting(bench.model, reference, mix, heldout, mode, epochs)
                fresh, _ = load(str(bench.model))
                steps = chosen["epochs"] * chosen["per_epoch"]
                info = baselines.finetune(
                    fresh,
                    tokenizer,
                    reference,
                    mode,
                    steps=steps,
                    lr=chosen["lr"],
                    replay=mix,
                    fmt="text",
                )
                scores = {t: _scores(fresh, splits[t]) for t in bench.tests}
                rows[name] = {
                    **{k: info[k] for k in ("seconds", "steps", "lr", "examples")},
                    "trainable_params": info["trainable_params"],
                    "epochs": chosen["epochs"],
                    "blas": bench_run.blas(),
                    "heldout_nll": chosen["scans"],
                    "splits": {t: bench_run.cell(plain[t], s) for t, s in scores.items()},
                }
                print(json.dumps({name: rows[name]["splits"]}), flush=True)
                path.write_text(json.dumps(results, indent=1))
    path.write_text(json.dumps(results, indent=1))
    return results


def _scores(model, dataset) -> dict:
    nll, targets = score_text(model, dataset.examples)
    return {"nll": nll, "targets": targets}


def report(results: dict) -> str:
    shifted, original = results["tests"]
    what = (
        "Perplexity on the test splits, difference to the plain model with a paired bootstrap "
        "95% interval over chunks. Replay: as many chunks of the model's training text as "
        "reference chunks, mixed into the batches. Learning rate and epochs chosen on the "
        "shifted held-out split (the untrained model counts: where no training beats it "
        "within 0.01 nats, the best trained point); seconds: the final training run, marked "
        "(MKL) when MKL was preloaded."
    )
    columns = ["fine-tuning", "shifted test ppl", "original test ppl", "epochs (steps)", "lr"]
    columns += ["trainable params", "training s"]
    lines = table_head(
        MARK,
        "Fine-tuning baselines on natural text",
        "python examples/natural_text/fine_tuning.py",
        results,
        what,
        columns,
    )
    for name, r in results["rows"].items():
        s, o = r["splits"][shifted], r["splits"][original]
        lines.append(
            f"| {name} | {bench_run._ci(s)} | {bench_run._ci(o)} | {r['epochs']} ({r['steps']}) "
            f"| {r['lr']:g} | {r['trainable_params']:,} "
            f"| {r['seconds']:.0f}{' (MKL)' if r.get('blas') == 'mkl' else ''} |"
        )
    lines += ["", bench_run.MARK.format(MARK, "end")]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results_fine_tuning.json"))
    ap.add_argument("--report", default=str(bench_run.ROOT / "EXPERIMENTS.md"))
    ap.add_argument("--epochs", type=int, default=20, help="most epochs scanned per row")
    ap.add_argument("--only", nargs="*", default=None, help="rows to (re)run, e.g. 'full, replay'")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.results)
    results = (
        json.loads(path.read_text()) if args.report_only else run(path, args.epochs, args.only)
    )
    section = report(results)
    bench_run.write_section(Path(args.report), MARK, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
