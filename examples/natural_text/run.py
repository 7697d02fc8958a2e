"""The natural-text benchmark (and the same table on the bundled model): plain model,
memories built several ways, and the oracle.

    python examples/natural_text/data.py    # splits by file (seconds)
    python examples/natural_text/train.py   # the model, then convert (~6 min on 2 busy cores)
    python examples/natural_text/run.py     # every variant; results_natural.json and
                                            # EXPERIMENTS.md's section (~20 min on 2 busy cores)
    python examples/natural_text/run.py --bench bundled  # the bundled model's text splits
    python examples/natural_text/run.py --report-only    # the section from the results file

Every memory is built with ``build_memory`` from the shifted reference split (examples
shuffled with seed 0, as the command does; exact search) and scored on the shifted and the
original test split against the plain model on the same examples (paired bootstrap 95%
intervals over examples). The oracle is a memory built on the shifted test examples
themselves, at the eta the first variant chose, with plain and with re-captured keys; its
mean lambda per layer on those examples says how well the memory finds what it stores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_knnmoe import KNNConfig, attach, detach, knn_stats, set_stats
from mlx_knnmoe.build.calibrate_rule import scaled
from mlx_knnmoe.build.pipeline import build_memory
from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR
from mlx_knnmoe.data.examples import load_dataset
from mlx_knnmoe.evaluation.bootstrap import paired_bootstrap, perplexity
from mlx_knnmoe.evaluation.scoring import score_text
from mlx_knnmoe.memory.compress import prune_agreeing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXACT = KNNConfig(search="exact", k=1)  # rows say when they use more neighbours
MARK = "<!-- {}: {} -->"  # the report section of a bench, between begin and end marks


class Variant(NamedTuple):
    """One row: build settings, what the row shows, retrieval changes (``KNNConfig`` fields,
    used for the build and the scoring) and an optional change to the built memory,
    ``post(model, memory, bench) -> memory``; rows with the same settings and retrieval share
    one build (run them together: the build time is the shared build's plus the change's)."""

    settings: dict
    text: str
    knn: dict | None = None
    post: Callable | None = None


def last_layers(n: int) -> Callable:
    """A ``post``: keep the memory of the last ``n`` MoE layers only."""

    def post(model, memory, bench):
        layers = sorted(memory.layers)
        return scaled(memory, {layer: float(layer in layers[-n:]) for layer in layers})

    return post


def with_guard_file(bench: Bench) -> dict:
    """Settings a ``guard`` variant adds: the bench's original-domain held-out split."""
    return {"guard": str(bench.data / f"{bench.guard}.jsonl")} if bench.guard else {}


# settings spelled out in full, so a row means the same when the defaults change
BEFORE = {"recapture": 0, "calibrate": False}  # build_memory's defaults before this benchmark
CALIBRATED = {"recapture": 1, "calibrate": True, "layer_eta": False}
LAYER_ETA = {**CALIBRATED, "layer_eta": True}
VARIANTS = {  # name -> Variant; run.py --only NAME... reruns some and keeps the others' rows
    "defaults": Variant(BEFORE, "build_memory defaults before this benchmark"),
    "recapture 1": Variant(
        {**BEFORE, "recapture": 1}, "keys re-captured with the memory attached, 1 pass"
    ),
    "recapture 1, calibrate": Variant(
        CALIBRATED,
        "and eta with per-layer bandwidth chosen on held-out data, guard sampled from the model",
    ),
    "calibrate, guard file": Variant(
        {**CALIBRATED, "guard": with_guard_file},
        "as above, guarded by the original domain's held-out split instead of sampled text",
    ),
    "calibrate, K 4": Variant(
        CALIBRATED,
        "as above, 4 neighbours per token with similarity-weighted values (built and scored): "
        "the package defaults now",
        {"k": 4},
    ),
    "calibrate, per-layer eta": Variant(
        LAYER_ETA,
        "as above, then each kept layer's eta chosen the same way (x1/3, x3 around the eta)",
    ),
    "per-layer eta, K 4": Variant(
        LAYER_ETA,
        "the per-layer-eta defaults with 4 neighbours per token (built and scored)",
        {"k": 4},
    ),
    "calibrate, K 4, guard 96": Variant(
        {**CALIBRATED, "guard_samples": 96},
        "the defaults with a guard of 96 sampled sequences instead of 24 (a narrower noise band)",
        {"k": 4},
    ),
    "calibrate, K 4, S 3": Variant(
        {**CALIBRATED, "steps": 3, "eta_grid": (1.0, 3.0, 10.0, 30.0, 100.0)},
        "the defaults with 3 gradient steps (eta grid 1 to 100: with S > 1 each eta is "
        "optimised on its own, and calibration tries only grid etas)",
        {"k": 4},
    ),
    "per-layer eta, last 2 layers": Variant(
        LAYER_ETA,
        "the per-layer-eta memory with its last 2 memorised layers only",
        None,
        last_layers(2),
    ),
    "per-layer eta, changed only": Variant(
        LAYER_ETA,
        "the per-layer-eta memory with only the entries whose optimised logits select other "
        "experts than the router does at the key",
        None,
        lambda model, memory, bench: prune_agreeing(memory, model),
    ),
    "per-layer eta, S 3": Variant(
        {**LAYER_ETA, "steps": 3, "eta_grid": (1.0, 3.0, 10.0, 30.0)},
        "the defaults with 3 gradient steps (eta grid 1, 3, 10, 30: with S > 1 each eta is "
        "optimised on its own, and calibration tries only grid etas)",
    ),
}
LAMBDA_CHUNKS = 20  # per-layer lambda: the first 20 chunks of a split, one at a time


class Bench(NamedTuple):
    """A model, its shifted reference split and the two test splits, in one record format."""

    title: str
    model: Path
    data: Path
    fmt: str
    reference: str = "shifted_reference"
    tests: tuple[str, str] = ("shifted_test", "original_test")
    guard: str | None = "original_heldout"  # original-domain text for a guard file

    def load(self, tokenizer, max_seq_len: int = 256) -> dict:
        def one(name: str):
            path = self.data / f"{name}.jsonl"
            return load_dataset(path, tokenizer, self.fmt, max_seq_len=max_seq_len)

        return {name: one(name) for name in (*self.tests, self.reference)}


BENCHES = {
    "natural": Bench(
        "Natural text: Python standard library (original) and C headers (shifted)",
        HERE / "model" / "mlx",
        HERE / "data",
        "text",
    ),
    "bundled": Bench(
        "Bundled letter-cipher model (prompt/completion text splits)",
        MODEL_DIR,
        DATA_DIR,
        "completion",
        "shift_ref_text",
        ("shift_test_text", "orig_test_text"),
        "orig_ref_text",
    ),
}


def score(model, dataset) -> dict:
    """Per-chunk NLL and targets, and mean lambda per MoE layer (when a memory is attached)."""
    nll, targets = score_text(model, dataset.examples)
    return {"nll": nll, "targets": targets, "lambda": layer_lambdas(model, dataset.examples)}


def layer_lambdas(model, examples) -> dict[str, float]:
    """Mean lambda per MoE layer over the positions of the first ``LAMBDA_CHUNKS`` examples,
    each run alone so that padding does not count."""
    set_stats(model)
    for e in examples[:LAMBDA_CHUNKS]:
        mx.eval(model(mx.array([e.tokens[:-1]])))
    stats = knn_stats(model)
    set_stats(model, False)
    return {str(layer): stats[layer]["mean_lambda"] for layer in sorted(stats)}


def cell(plain: dict, other: dict) -> dict:
    arrays = lambda s: {"nll": s["nll"], "targets": s["targets"]}  # noqa: E731
    d = paired_bootstrap(perplexity, arrays(plain), arrays(other), 1000, 0)
    return {"ppl": perplexity(arrays(other)), "diff": d["diff"], "ci95": d["ci95"]}


def blas() -> str:
    """``mkl`` when MKL is preloaded for speed (README, "The machine"), else ``mlx``: build
    times of the two are not comparable."""
    return "mkl" if "mkl" in os.environ.get("LD_PRELOAD", "") else "mlx"


def resolved(settings: dict, bench: Bench) -> dict:
    """The build settings, a callable value (``with_guard_file``) replaced by its result."""
    out = {}
    for key, value in settings.items():
        out.update(value(bench) if callable(value) else {key: value})
    return out


def build(model, tokenizer, build_from, settings: dict, retrieval: KNNConfig) -> tuple:
    started = time.perf_counter()
    memory = build_memory(model, tokenizer, build_from, retrieval=retrieval, **settings)
    return memory, time.perf_counter() - started


def run_variant(model, tokenizer, splits, plain, name, variant, build_from, bench, built=None):
    """One row. ``built``: a cache of memories by (settings, retrieval), shared by rows that
    differ only in their ``post``."""
    variant = Variant(*variant)
    settings = resolved(variant.settings, bench)
    retrieval = EXACT.updated(**(variant.knn or {}))
    key = json.dumps([settings, retrieval.record()], sort_keys=True)
    built = {} if built is None else built
    if key not in built:
        built[key] = build(model, tokenizer, build_from, settings, retrieval)
    memory, seconds = built[key]
    record = memory.build
    if variant.post is not None:
        started = time.perf_counter()
        memory = variant.post(model, memory, bench)
        seconds += time.perf_counter() - started
    attach(model, memory, retrieval, validate=False)
    try:
        scores = {t: score(model, splits[t]) for t in plain}
    finally:
        detach(model)
    row = {
        "name": name,
        "settings": settings,
        "knn": variant.knn or {},
        "build_seconds": round(seconds, 1),
        "blas": blas(),
        "recapture_seconds": record.get("recapture_seconds"),
        "eta": record["eta"],
        "entries": {str(k): v for k, v in memory.num_entries().items()},
        "calibration": {
            k: v
            for k, v in record.get("calibration", {}).items()
            if k in ("eta", "scales", "layer_eta")
        },
        "splits": {t: {**cell(plain[t], s), "lambda": s["lambda"]} for t, s in scores.items()},
    }
    print(json.dumps(row), flush=True)
    return row, memory


def run(
    bench: Bench,
    variants: dict,
    oracle: bool = True,
    eta: float | None = None,
    saved: Callable[[dict], None] | None = None,
) -> dict:
    """Plain scores, one row per variant and (``oracle``) the oracle rows, at the eta of the
    first variant (or ``eta``). ``saved(results so far)`` is called after every row."""
    from mlx_lm import load

    model, tokenizer = load(str(bench.model))
    splits = bench.load(tokenizer)
    shifted, original = bench.tests
    started = time.perf_counter()
    plain = {t: score(model, splits[t]) for t in bench.tests}
    results = {
        "title": bench.title,
        "tests": list(bench.tests),
        "model": str(bench.model),
        "sizes": {name: len(d.examples) for name, d in splits.items()},
        "tokens": {name: d.num_tokens() for name, d in splits.items()},
        "plain": {t: perplexity(s) for t, s in plain.items()},
        "plain_seconds": round(time.perf_counter() - started, 1),
        "rows": [],
        "oracle": [],
        "descriptions": {k: Variant(*v).text for k, v in variants.items()},
    }
    built = {}
    reference = splits[bench.reference]
    for name, variant in variants.items():
        row, _ = run_variant(
            model, tokenizer, splits, plain, name, variant, reference, bench, built
        )
        results["rows"].append(row)
        eta = eta if eta is not None else row["eta"]
        if saved is not None:
            saved(results)
    layers = len(model.layers)
    for passes in (0, layers - 1) if oracle else ():
        settings = {"eta": eta or 10.0, "recapture": passes}
        name = f"oracle, recapture {passes}"
        test_only = {shifted: plain[shifted]}
        variant = Variant(settings, "")
        row, _ = run_variant(
            model, tokenizer, splits, test_only, name, variant, splits[shifted], bench
        )
        results["oracle"].append(row)
        if saved is not None:
            saved(results)
    return results


def merged(old: dict, new: dict) -> dict:
    """``new`` rows replace ``old`` rows of the same name, the others are kept, in
    ``VARIANTS`` order (unknown names last); oracle rows likewise."""
    order = list(VARIANTS)

    def union(a: list, b: list, rank) -> list:
        rows = {r["name"]: r for r in a} | {r["name"]: r for r in b}
        return sorted(rows.values(), key=rank)

    rank = lambda r: order.index(r["name"]) if r["name"] in order else len(order)  # noqa: E731
    out = {**old, **{k: v for k, v in new.items() if k not in ("rows", "oracle")}}
    out["rows"] = union(old.get("rows", []), new["rows"], rank)
    out["oracle"] = union(old.get("oracle", []), new["oracle"], lambda r: r["name"])
    out["descriptions"] = {**old.get("descriptions", {}), **new["descriptions"]}
    return out


def _lambdas(c: dict) -> str:
    """Mean lambda per MoE layer (a layer the memory leaves out is not listed)."""
    lam = c["lambda"]
    return ", ".join(f"L{layer}: {lam[layer]:.2f}" for layer in sorted(lam, key=int))


def _scales(row: dict) -> str:
    c = row.get("calibration") or {}
    if not c:
        return ""
    scales = ", ".join(f"L{layer} x{s:g}" for layer, s in sorted(c["scales"].items()))
    etas = c.get("layer_eta") or {}
    kept = [layer for layer, s in sorted(c["scales"].items()) if s > 0]
    per_layer = ", ".join(f"L{layer} {etas[layer]:g}" for layer in kept if layer in etas)
    per_layer = f", eta per layer {per_layer}" if per_layer else ""
    return f" (chosen: eta {c['eta']:g}, bandwidth {scales}{per_layer})"


def _text(name: str, results: dict) -> str:
    """What a row shows: the variant's current text, else the one its run recorded."""
    return VARIANTS[name].text if name in VARIANTS else results["descriptions"].get(name, "")


def _entries(row: dict) -> str:
    """Entries per memorised layer (one number when every layer has the same)."""
    n = row["entries"]
    if isinstance(n, int) or len(set(n.values())) == 1:
        return str(n if isinstance(n, int) else next(iter(n.values())))
    return ", ".join(f"L{layer}: {v}" for layer, v in sorted(n.items(), key=lambda x: int(x[0])))


def _seconds(row: dict) -> str:
    mark = " (MKL)" if row.get("blas") == "mkl" else ""
    return f"{row['build_seconds']:.0f} ({row['recapture_seconds'] or 0:.0f}){mark}"


def _ci(c: dict) -> str:
    return f"{c['ppl']:.2f} ({c['diff']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}])"


def report(bench: str, results: dict) -> str:
    p, (shifted, original) = results["plain"], results["tests"]
    lines = [
        MARK.format(bench, "begin"),
        f"## {results['title']}",
        "",
        f"Made by `python examples/natural_text/run.py --bench {bench}` (sizes: "
        + ", ".join(f"{k} {v} examples" for k, v in results["sizes"].items())
        + "). Perplexity on the test splits, difference to the plain model with a paired "
        "bootstrap 95% interval over examples; lambda: mean per MoE layer on the split's first "
        f"{LAMBDA_CHUNKS} examples (each run alone: no padding). Exact search. Build times on 2 "
        "shared CPU cores with MLX's own BLAS, or marked (MKL) with MKL preloaded (several "
        "times faster; the perplexities do not depend on it).",
        "",
        "| variant | shifted test ppl | original test ppl | lambda per layer (shifted) | "
        "lambda (original) | eta | entries | build s (re-capture s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| plain | {p[shifted]:.2f} | {p[original]:.2f} | | | | | |",
    ]
    for r in results["rows"]:
        s, o = r["splits"][shifted], r["splits"][original]
        lines.append(
            f"| {r['name']}: {_text(r['name'], results)}{_scales(r)} "
            f"| {_ci(s)} | {_ci(o)} "
            f"| {_lambdas(s)} | {np.mean(list(o['lambda'].values())):.3f} | {r['eta']:g} "
            f"| {_entries(r)} | {_seconds(r)} |"
        )
    for r in results["oracle"]:
        s = r["splits"][shifted]
        lines.append(
            f"| {r['name']}: memory of the shifted test examples themselves | {_ci(s)} | "
            f"| {_lambdas(s)} "
            f"| | {r['eta']:g} | {_entries(r)} | {_seconds(r)} |"
        )
    lines += ["", MARK.format(bench, "end")]
    return "\n".join(lines)


def write_section(path: Path, bench: str, section: str) -> None:
    """Replace the bench's section of ``path`` (or append it)."""
    begin, end = MARK.format(bench, "begin"), MARK.format(bench, "end")
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", choices=sorted(BENCHES), default="natural")
    ap.add_argument("--results", default=None, help="default: results_<bench>.json here")
    ap.add_argument("--report", default=str(ROOT / "EXPERIMENTS.md"))
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="variant names to run (and 'oracle'); the results file keeps the other rows",
    )
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    results_path = Path(args.results or HERE / f"results_{args.bench}.json")
    if not args.report_only:
        unknown = set(args.only or ()) - set(VARIANTS) - {"oracle"}
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}, oracle")
        variants = {k: v for k, v in VARIANTS.items() if args.only is None or k in args.only}
        with_oracle = args.only is None or "oracle" in args.only
        old = json.loads(results_path.read_text()) if results_path.exists() else {}
        eta = None if args.only is None else (old.get("rows") or [{}])[0].get("eta")

        def saved(results: dict) -> None:  # after every row: an interrupted run keeps its rows
            results = results if args.only is None else merged(old, results)
            results_path.write_text(json.dumps(results, indent=1))

        saved(run(BENCHES[args.bench], variants, with_oracle, eta, saved))
    results = json.loads(results_path.read_text())
    section = report(args.bench, results)
    write_section(Path(args.report), args.bench, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
