"""Reproduce the paper's claims at small scale on the bundled model; writes EXPERIMENTS.md.

    python examples/reproduce/run.py                  # all experiments, ~25 min with MKL
    python examples/reproduce/run.py --only cost      # one group: main, ablations, buckets, cost
    python examples/reproduce/run.py --report-only    # rewrite EXPERIMENTS.md from results.json

Every kNN-MoE row builds its memory with ``mlx_knnmoe.build_memory`` from the shifted
reference split (800 prompt/completion examples unless the row says otherwise), eta chosen by
the builder's held-out scan with the row's own retrieval settings, and is scored with
``mlx_knnmoe.evaluate`` on the four test splits against the plain model on the same
examples (paired bootstrap 95% intervals). Baselines come from ``baselines.py``.

On Linux, preloading MKL makes MLX's CPU matmul several times faster (optional):
    LD_PRELOAD=<venv>/lib/libmkl_rt.so.3 MKL_THREADING_LAYER=SEQUENTIAL python ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from mlx_knnmoe import KNNConfig, attach, detach  # noqa: E402
from mlx_knnmoe.build.pipeline import build_memory  # noqa: E402
from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR  # noqa: E402
from mlx_knnmoe.evaluation.bundled_demo import SPLITS, load_split  # noqa: E402
from mlx_knnmoe.evaluation.compare import compare, evaluate_variant  # noqa: E402

# The paper's method, which the package defaults have moved beyond (EXPERIMENTS.md, "Beyond the
# paper"): one neighbour, keys from the plain model, no calibration. Rows may override them.
PAPER = KNNConfig(k=1)
PAPER_BUILD = {"recapture": 0, "calibrate": False}
RESULTS = HERE / "results.json"
FIGURES = HERE / "figures"
REPORT = ROOT / "EXPERIMENTS.md"


class Bench:
    """The bundled model, its test splits, and the plain model's scores on them."""

    def __init__(self, model_dir: Path = MODEL_DIR, data_dir: Path = DATA_DIR):
        from mlx_lm import load

        self.model_dir, self.data_dir = model_dir, data_dir
        self.model, self.tokenizer = load(str(model_dir))
        self.splits = {s: load_split(data_dir / f"{s}.jsonl", self.tokenizer, None) for s in SPLITS}
        self.plain = self.score()

    def score(self, model=None) -> dict:
        model = model or self.model
        out = {}
        for split, (items, examples) in self.splits.items():
            out[split] = evaluate_variant(model, self.tokenizer, items, examples, 4096)
            out[split]["seconds"] = 0.0
        return out

    def row(self, name: str, scores: dict, seconds: float, **info) -> dict:
        """Metric and difference to plain per split (and the perplexity buckets)."""
        row = {"name": name, "seconds": seconds, **info, "splits": {}}
        for split, res in scores.items():
            mc = split.endswith("_mc")
            res = {"seconds": 0.0, **res}
            summary = compare({"plain": self.plain[split], name: res}, mc, 1000, 0, 4)
            v = summary["variants"][1]
            metric = "acc" if mc else "ppl"
            cell = {"value": v[metric], "plain": summary["variants"][0][metric]}
            if "vs_plain" in v:
                cell.update(diff=v["vs_plain"][metric]["diff"], ci95=v["vs_plain"][metric]["ci95"])
            if not mc:  # mean answer NLL per token too, the quantity the builder optimises
                a = res["arrays"]
                cell["nll"] = float(a["nll"].sum() / a["targets"].sum())
            if v["routing"]:
                cell["lambda"] = v["routing"]["mean_lambda"]
            row["splits"][split] = cell
        return row

    def knn(self, name: str, ref: str = "shift_ref_text", ref_examples=None, **kw) -> dict:
        """Build a memory (eta auto unless given) and score it with ``config``."""
        config = kw.pop("config", PAPER)
        tic = time.perf_counter()
        memory = build_memory(
            self.model,
            self.tokenizer,
            self.data_dir / f"{ref}.jsonl",
            eta=kw.pop("eta", "auto"),
            max_examples=ref_examples,
            config=config,
            progress=False,
            **{**PAPER_BUILD, **kw},
        )
        build_s = time.perf_counter() - tic
        attach(self.model, memory, config)
        try:
            scores = self.score()
        finally:
            detach(self.model)
        entries = memory.num_entries()[memory.layers[0]]
        row = self.row(name, scores, build_s, eta=memory.build["eta"], entries=entries)
        print(_line(row), flush=True)
        return row, scores


def _line(row: dict) -> str:
    cells = [f"{row['name']:<36}"]
    for split, c in row["splits"].items():
        d = f"{c['diff']:+.3f}" if "diff" in c else ""
        cells.append(f"{split} {c['value']:.3f}{d}")
    return "  ".join(cells) + f"  ({row['seconds']:.1f}s)"


# ------------------------------------------------------------------------------ experiments


def main_comparison(bench: Bench) -> list[dict]:
    rows = [bench.row("zero-shot", bench.plain, 0.0)]
    for mix in ("topk", "logits", "union"):
        row, scores = bench.knn(f"kNN-MoE {mix}", config=PAPER.updated(mix=mix))
        rows.append(row)
        if mix == "topk":
            bench.best_scores = scores
    import baselines
    import c3po
    from mlx_lm import load

    replay = bench.data_dir / "orig_train_text.jsonl"
    for mode, name, extra in (
        ("router", "router fine-tuning", {}),
        ("lora", "lora fine-tuning", {}),
        ("full", "full fine-tuning", {}),
        ("full", "full fine-tuning + replay", {"replay": replay}),
    ):
        model, tokenizer = load(str(bench.model_dir))
        ref = bench.data_dir / "shift_ref_text.jsonl"
        info = baselines.finetune(model, tokenizer, ref, mode, **extra)
        row = bench.row(name, bench.score(model), info["seconds"], train=info)
        print(_line(row), flush=True)
        rows.append(row)
    ref_path = bench.data_dir / "shift_ref_text.jsonl"
    for tokens, name in (("all", "C3PO-style, every token"), ("last", "C3PO-style, last token")):
        tic = time.perf_counter()
        reference = c3po.c3po_reference(bench.model, bench.tokenizer, ref_path)
        scores = {}
        for split, (items, examples) in bench.splits.items():
            arrays = c3po.c3po_arrays(
                bench.model,
                bench.tokenizer,
                ref_path,
                items=items,
                examples=examples,
                reference=reference,
                tokens=tokens,
            )
            scores[split] = {"arrays": arrays, "routing": None}
        row = bench.row(name, scores, time.perf_counter() - tic)
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def ablations(bench: Bench) -> dict[str, list[dict]]:
    out = {}
    out["K"] = [bench.knn(f"K={k}", config=KNNConfig(k=k))[0] for k in (1, 3, 5, 8)]
    out["similarity"] = [
        bench.knn(f"{s}", config=PAPER.updated(similarity=s))[0] for s in ("rbf", "cosine")
    ]
    out["S"] = [bench.knn(f"S={s}", steps=s)[0] for s in (1, 3, 10)]
    out["reference size"] = [bench.row("0 (zero-shot)", bench.plain, 0.0, ref_examples=0)]
    for n in (250, 500, 800):
        row = bench.knn(f"{n} examples", ref_examples=n)[0]
        out["reference size"].append(dict(row, ref_examples=n))
    out["dense surrogate [ours]"] = [
        bench.knn(f"k'={s}", surrogate=s)[0] for s in ("off", 4, "auto", 16)
    ]
    out["gradient scope [ours]"] = [
        bench.knn(f"scope={s}", scope=s)[0] for s in ("sequence", "token")
    ]
    out["reference format"] = [
        bench.knn(f"memory from {ref}", ref=ref)[0] for ref in ("shift_ref_text", "shift_ref_mc")
    ]
    return out


def perplexity_buckets(bench: Bench) -> dict:
    """Shifted and original test examples together, bucketed by the plain model's answer
    perplexity (text) or prompt perplexity (multiple choice)."""
    scores = getattr(bench, "best_scores", None)
    if scores is None:
        _, scores = bench.knn("kNN-MoE topk")
    out = {}
    for fmt in ("text", "mc"):
        both = {}
        for name, src in (("plain", bench.plain), ("kNN-MoE", scores)):
            arrays = [src[f"{d}_test_{fmt}"]["arrays"] for d in ("shift", "orig")]
            keys = arrays[0].keys()
            both[name] = {
                "arrays": {k: np.concatenate([a[k] for a in arrays]) for k in keys},
                "routing": None,
                "seconds": 0.0,
            }
        summary = compare(both, fmt == "mc", 1000, 0, 4)
        out[fmt] = summary["buckets"]
    return out


def cost(bench: Bench, gen_tokens: int = 64, repeats: int = 5) -> dict:
    """Prefill and decode tokens/s with the default memory (exact and hnsw search) as ratios to
    the plain model measured right after each, and the memory's size next to the model's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_knnmoe.speed.bench import measure

    memory = build_memory(
        bench.model,
        bench.tokenizer,
        bench.data_dir / "shift_ref_text.jsonl",
        progress=False,
        **PAPER_BUILD,
    )
    prompt_text = " ".join(r["prompt"] for r in _records(bench, "shift_test_text", 8))
    prompt = mx.array(bench.tokenizer.encode(prompt_text))
    measure(bench.model, prompt, 8, 1)  # warm-up
    rows = []
    for search in ("exact", "hnsw"):
        attach(bench.model, memory, PAPER.updated(search=search))
        mx.eval(bench.model(prompt[None, :4]))  # builds the index
        p, d = measure(bench.model, prompt, gen_tokens, repeats)
        detach(bench.model)
        p0, d0 = measure(bench.model, prompt, gen_tokens, repeats)
        rows.append(dict(search=search, prefill_ratio=p / p0, decode_ratio=d / d0, plain_d=d0))
        print(f"cost {search}: prefill {p / p0:.3f}x, decode {d / d0:.3f}x", flush=True)
    model_bytes = sum(v.nbytes for _, v in tree_flatten(bench.model.parameters()))
    mem_bytes = sum(memory.keys[i].nbytes + memory.logits[i].nbytes for i in memory.layers)
    return {
        "rows": rows,
        "prompt_tokens": int(prompt.size),
        "gen_tokens": gen_tokens,
        "model_mb": model_bytes / 2**20,
        "memory_mb": mem_bytes / 2**20,
        "entries": memory.num_entries()[memory.layers[0]],
    }


def _records(bench: Bench, split: str, n: int) -> list[dict]:
    with open(bench.data_dir / f"{split}.jsonl") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["main", "ablations", "buckets", "cost"], action="append")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report_only:
        groups = args.only or ["main", "ablations", "buckets", "cost"]
        started = time.perf_counter()
        bench = Bench()
        if "main" in groups:
            results["main"] = main_comparison(bench)
        if "ablations" in groups:
            results["ablations"] = ablations(bench)
        if "buckets" in groups:
            results["buckets"] = perplexity_buckets(bench)
        if "cost" in groups:
            results["cost"] = cost(bench)
        if not args.only:
            results["seconds"] = time.perf_counter() - started
        RESULTS.write_text(json.dumps(results, indent=1, default=_jsonable))
    from report import write_report

    write_report(results, REPORT, FIGURES)
    print(f"wrote {REPORT} and {FIGURES}/")


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


if __name__ == "__main__":
    main()
