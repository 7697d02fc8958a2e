"""Check that kNN-MoE can help the bundled model, with the package's own tools.

    python examples/bundled/verify.py oracle     # memory built on the shifted test items
    python examples/bundled/verify.py transfer   # memory from shifted ref, scored on tests
    python examples/bundled/verify.py specialisation  # per-task expert usage

Every number is the difference to the plain model on the same examples, with a paired
bootstrap 95% interval (``mlx_knnmoe.stats.paired_bootstrap``): mean answer NLL per target
token for the text splits, accuracy for the multiple-choice (MMLU-format) splits.

With S = 1 the optimised logits are linear in the step size, ``r(eta) = z + eta (r(1) - z)``,
and ``z = x W_r`` follows from the stored router inputs, so one build with eta = 1 gives the
memory for every eta of a grid (the builder does the same internally).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_knnmoe import KNNConfig, Memory, attach, build_memory, detach, knn_stats, set_stats
from mlx_knnmoe.data.examples import load_dataset
from mlx_knnmoe.data.formats import multiple_choice
from mlx_knnmoe.data.records import read_records
from mlx_knnmoe.evaluation.bootstrap import mean_of, paired_bootstrap
from mlx_knnmoe.evaluation.scoring import score_choices, score_text
from mlx_knnmoe.retrieval.attach import routers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import RecordingGate  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL = ROOT / "mlx_knnmoe" / "bundled" / "model"
DATA = ROOT / "mlx_knnmoe" / "bundled" / "data"


def nll_per_token(a: dict) -> float:
    return float(a["nll"].sum() / max(a["targets"].sum(), 1.0))


class Evaluator:
    """Loads an eval split once; scores the model as it is (memory attached or not)."""

    def __init__(self, model, tokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.mc = "_mc" in path.name
        if self.mc:
            self.items = [multiple_choice(r, "mmlu") for _, r in read_records(path)]
        else:
            self.examples = load_dataset(path, tokenizer, "completion", shuffle=False).examples
        self.plain = self.score()

    def score(self) -> dict:
        if self.mc:
            s = score_choices(self.model, self.tokenizer, self.items)
            # NLL of the gold letter among the four: softmax over the letters' log-likelihoods
            ll = s.loglik - np.logaddexp.reduce(s.loglik, axis=-1, keepdims=True)
            nll = -ll[np.arange(len(s.gold)), s.gold]
            return {"acc": s.acc, "nll": nll, "targets": np.ones_like(nll)}
        nll, targets = score_text(self.model, self.examples)
        return {"nll": nll, "targets": targets}

    def compare(self, seed: int = 0) -> dict:
        other = self.score()
        out = {"nll": paired_bootstrap(nll_per_token, _nt(self.plain), _nt(other), 1000, seed)}
        out["nll"]["plain"] = nll_per_token(self.plain)
        if self.mc:
            acc = paired_bootstrap(
                mean_of("acc"), {"acc": self.plain["acc"]}, {"acc": other["acc"]}
            )
            acc["plain"] = float(self.plain["acc"].mean())
            out["acc"] = acc
        return out


def _nt(a):
    return {"nll": a["nll"], "targets": a["targets"]}


def rescale(memory: Memory, model, eta: float) -> Memory:
    """The memory for step size ``eta`` from one built with eta = 1 (S = 1)."""
    logits = {}
    for layer, r1 in memory.logits.items():
        w = routers(model)[layer].inner.weight if routers(model) else None
        if w is None:
            w = model.layers[layer].mlp.gate.weight
        z = memory.keys[layer].astype(mx.float32) @ w.T.astype(mx.float32)
        logits[layer] = z + eta * (r1 - z)
    return Memory(
        memory.keys, logits, memory.fingerprint, memory.bandwidth, dict(memory.build, eta=eta)
    )


def with_memory(model, memory, config, evaluators) -> dict:
    attach(model, memory, config, validate=False)
    res = {}
    try:
        for name, ev in evaluators.items():
            set_stats(model)
            res[name] = ev.compare()
            stats = knn_stats(model)
            res[name]["lambda"] = float(np.mean([s["mean_lambda"] for s in stats.values()]))
            res[name]["changed"] = float(np.mean([s["changed_share"] for s in stats.values()]))
    finally:
        set_stats(model, False)
        detach(model)
    return res


def line(tag: str, res: dict) -> str:
    cells = []
    for name, r in res.items():
        cells.append(f"| {name} lam {r['lambda']:.2f} chg {r['changed']:.0%}")
        for metric in ("acc", "nll"):
            if metric in r:
                d = r[metric]
                cells.append(
                    f"{name}.{metric} {d['plain']:.3f}{d['diff']:+.3f}"
                    f"[{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}]"
                )
    return f"{tag:<34} " + "  ".join(cells)


def build(model, tokenizer, path: Path, surrogate, scope, keep="all") -> Memory:
    return build_memory(
        model,
        tokenizer,
        path,
        format="auto",
        eta=1.0,
        surrogate=surrogate,
        scope=scope,
        keep=keep,
        progress=False,
    )


def grid(args, model, tokenizer) -> list[dict]:
    """Oracle (memory from the evaluated split itself) or transfer (from shifted ref)."""
    data = Path(args.data)
    ks = [int(k) for k in args.ks.split(",")]
    scales = [float(v) for v in args.lambda_scales.split(",")]
    results = []
    for fmt in args.formats.split(","):
        mem_fmt = args.memory_format or fmt
        if args.what == "oracle":
            mem_path = data / f"shift_test_{mem_fmt}.jsonl"
            evals = {"shift_test": data / f"shift_test_{fmt}.jsonl"}
        else:
            mem_path = data / f"shift_ref_{mem_fmt}.jsonl"
            evals = {
                "shift_test": data / f"shift_test_{fmt}.jsonl",
                "orig_test": data / f"orig_test_{fmt}.jsonl",
            }
        evaluators = {k: Evaluator(model, tokenizer, v) for k, v in evals.items()}
        for scope in args.scopes.split(","):
            for sur in (int(s) for s in args.surrogates.split(",")):
                tic = time.perf_counter()
                base = build(model, tokenizer, mem_path, sur or None, scope)
                print(
                    f"[{fmt}] memory from {mem_path.name} scope={scope} surrogate={sur}: "
                    f"{base.num_entries()[base.layers[0]]} entries/layer, "
                    f"{time.perf_counter() - tic:.1f}s",
                    flush=True,
                )
                built = dict(fmt=fmt, memory=mem_path.name, scope=scope, surrogate=sur)
                for eta in (float(e) for e in args.etas.split(",")):
                    memory = rescale(base, model, eta)
                    for mix in args.mixes.split(","):
                        for k, ls in itertools.product(ks, scales):
                            config = KNNConfig(k=k, mix=mix, search="exact", lambda_scale=ls)
                            res = with_memory(model, memory, config, evaluators)
                            tag = f"{fmt} sur={sur} eta={eta:g} {mix} K={k} ls={ls:g}"
                            print(line(tag, res), flush=True)
                            chosen = dict(eta=eta, mix=mix, k=k, lambda_scale=ls)
                            results.append({**built, **chosen, **res})
    return results


TASKS = ("next", "back", "flip", "half", "pair", "upper", "code", "key")


def routing_histograms(model, tokenizer, path: Path) -> dict:
    """(layer, task) -> histogram of the experts the blocks select at answer-predicting
    positions, with whatever memory is attached."""
    from mlx_knnmoe.data.examples import encode_pair

    k = model.layers[0].mlp.top_k
    n = model.layers[0].mlp.num_experts
    sinks = {i: [] for i in range(len(model.layers))}
    for i, layer in enumerate(model.layers):
        layer.mlp.gate = RecordingGate(layer.mlp.gate, sinks[i])  # what the block routes on
    counts = {}
    try:
        for _, r in read_records(path):
            p, c = encode_pair(tokenizer, r["prompt"], r["completion"])
            for sink in sinks.values():
                sink.clear()
            mx.eval(model(mx.array([p + c][:1])[:, :-1]))
            for i, sink in sinks.items():
                z = np.array(sink[0].astype(mx.float32)).reshape(-1, n)[len(p) - 1 :]
                top = np.argsort(-z, axis=-1)[:, :k].reshape(-1)
                h = counts.setdefault((i, r["task"]), np.zeros(n))
                h += np.bincount(top, minlength=n)
    finally:
        for layer in model.layers:
            layer.mlp.gate = layer.mlp.gate.inner
    return counts


def specialisation(args) -> dict:
    """Per layer and task: the share of top-k slots at answer-predicting positions of the text
    test splits that go to the task's hinted experts {t, t + 8}: original register, shifted
    register, and shifted register with a memory from the shifted reference split."""
    from mlx_lm import load

    model, tokenizer = load(args.model)
    data = Path(args.data)
    n = model.layers[0].mlp.num_experts
    config = KNNConfig()  # package defaults, as the demo uses them
    memory = build_memory(model, tokenizer, data / "shift_ref_text.jsonl", progress=False)
    out = {}
    for name, register, mem in (
        ("orig", "orig", None),
        ("shift", "shift", None),
        ("shift+memory", "shift", memory),
    ):
        if mem is not None:
            attach(model, mem, config)
        try:
            counts = routing_histograms(model, tokenizer, data / f"{register}_test_text.jsonl")
        finally:
            if mem is not None:
                detach(model)
        for layer in sorted({lay for lay, _ in counts}):
            own = []
            for t, task in enumerate(TASKS):
                h = counts[(layer, task)] / counts[(layer, task)].sum()
                own.append(h[t] + h[t + len(TASKS)])
                out.setdefault(name, {}).setdefault(str(layer), {})[task] = {
                    "hinted_share": round(float(own[-1]), 3),
                    "top_experts": [int(e) for e in np.argsort(-h)[:3]],
                    "histogram": [round(float(v), 3) for v in h],
                }
            print(
                f"{name:<13} layer {layer}: share on the task's hinted experts "
                + " ".join(f"{t} {o:.2f}" for t, o in zip(TASKS, own))
                + f" | mean {np.mean(own):.2f} (chance {2 / n:.2f})",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["oracle", "transfer", "specialisation"])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--formats", default="text,mc", help="formats of the evaluated splits")
    ap.add_argument("--memory-format", default=None, help="format of the memory's split")
    ap.add_argument("--etas", default="0.3,1,3,10,30,100")
    ap.add_argument("--mixes", default="topk,logits,union")
    ap.add_argument("--ks", default="1")
    ap.add_argument("--lambda-scales", default="1")
    ap.add_argument("--surrogates", default="0,16", help="0: off; K': dense surrogate")
    ap.add_argument("--scopes", default="sequence")
    ap.add_argument("--output", default=None, help="JSON file for all results")
    args = ap.parse_args()
    if args.what == "specialisation":
        results = specialisation(args)
    else:
        from mlx_lm import load

        model, tokenizer = load(args.model)
        results = grid(args, model, tokenizer)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
