"""Compare a transformers MoE checkpoint in PyTorch with its MLX conversion, with and without
a memory attached, on a probe text.

    python -m mlx_knnmoe.pytorch.parity --model DIR [--mlx-model DIR] --device cuda \\
        [--memory FILE] [--dtype float32] [--text "..."]

Prints, for the plain models and for each mixing mode with the memory: the relative error of
the final logits (max |torch - mlx| / max |mlx|), the next-token top-1 and top-5 agreement,
and per MoE layer the share of tokens whose selected experts (as sets) agree, with the
router logits' relative error (plain) or the mean lambda on each side (memory). Without
``--mlx-model`` the checkpoint is converted to a temporary directory by
``mlx_knnmoe.convert``. MLX's CPU expert kernels take float32 only, so on the CPU the MLX
model runs in float32 whatever ``--dtype`` says.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_map
from mlx_lm import load as mlx_load

from ..arch.specs import get_path, moe_layers, set_path, spec_for
from ..build.taps import capture_router_inputs as mlx_capture
from ..config import MIX_MODES, SIMILARITIES, KNNConfig
from ..conversion.convert_model import convert_model
from ..memory.fingerprint import fingerprint as mlx_fingerprint
from ..memory.store import Memory as MlxMemory
from ..retrieval.attach import attach as mlx_attach
from ..retrieval.attach import detach as mlx_detach
from ..retrieval.attach import install, knn_stats, set_stats
from .loading import DTYPES, load_model
from .router import attach, capture_router_inputs, detach, record_routing
from .store import Memory, fingerprint

PROBE = (
    "The patient, a 45-year-old man, presents with fever, cough and shortness of breath. "
    "Question: which of the following is the most likely diagnosis? Answer: B.\n"
    "def route(x, W, k):\n    scores = softmax(x @ W)\n    return topk(scores, k)\n"
)


# -- the two sides ---------------------------------------------------------------------------
class SelectionTap(nn.Module):
    """Records the experts an MLX gate (possibly our wrapper) selects, passing its output on."""

    def __init__(self, inner, routing, returns, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "sink", sink)  # plain attributes, never parameters
        self.routing, self.returns = routing, returns

    def __call__(self, x):
        out = self.inner(x)
        inds = out[0] if self.returns == "assignment" else self.routing.select(out)[0]
        self.sink.append(inds.reshape(-1, inds.shape[-1]))
        return out


def torch_run(model, ids: np.ndarray) -> dict:
    """Final logits [L, V], per MoE layer: selected experts [L, k], router logits, lambda."""
    device = next(model.parameters()).device
    with torch.no_grad(), capture_router_inputs(model) as cap, record_routing(model) as rec:
        logits = model(input_ids=torch.tensor(ids, device=device)).logits
    return {
        "logits": logits[0].float().cpu().numpy(),
        "experts": {i: r[0][1].cpu().numpy() for i, r in rec.items()},
        "router": {i: c[0][1].cpu().numpy() for i, c in cap.items()},
        "lambda": {i: float(r[0][0].float().mean()) for i, r in rec.items()},
    }


def mlx_run(model, ids: np.ndarray) -> dict:
    """The same for an MLX model, with a tap around each (possibly wrapped) gate."""
    spec, routers = spec_for(model), install(model)
    sinks = {}
    for layer, block in moe_layers(model).items():
        sinks[layer] = []
        gate = get_path(block, spec.gate)
        set_path(
            block,
            spec.gate,
            SelectionTap(gate, routers[layer].routing, spec.gate_returns, sinks[layer]),
        )
    set_stats(model, True)
    try:
        with mlx_capture(model) as cap:
            logits = model(mx.array(ids)).astype(mx.float32)
            mx.eval(logits, sinks, cap)
        stats = knn_stats(model)
    finally:
        set_stats(model, False)
        for block in moe_layers(model).values():
            set_path(block, spec.gate, get_path(block, spec.gate).inner)
    return {
        "logits": np.array(logits[0]),
        "experts": {i: np.array(s[0]) for i, s in sinks.items()},
        "router": {i: np.array(c[0][1].astype(mx.float32)) for i, c in cap.items()},
        "lambda": {i: stats[i]["mean_lambda"] if i in stats else 0.0 for i in sinks},
    }


# -- comparing -------------------------------------------------------------------------------
def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def set_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose entries agree as sets."""
    return float((np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1).mean())


def top_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return set_agreement(np.argsort(-a, axis=-1)[:, :k], np.argsort(-b, axis=-1)[:, :k])


def compare(t: dict, m: dict) -> dict:
    layers = sorted(t["experts"])
    return {
        "logits_error": relative_error(t["logits"], m["logits"]),
        "top1": top_agreement(t["logits"], m["logits"], 1),
        "top5": top_agreement(t["logits"], m["logits"], 5),
        "layers": {
            i: {
                "experts": set_agreement(t["experts"][i], m["experts"][i]),
                "router_error": relative_error(t["router"][i], m["router"][i]),
                "lambda_torch": t["lambda"][i],
                "lambda_mlx": m["lambda"][i],
            }
            for i in layers
        },
    }


def run_parity(
    torch_model,
    mlx_model,
    ids: np.ndarray,
    memory: str | Path | None = None,
    modes: tuple[str, ...] = MIX_MODES,
    config: KNNConfig | None = None,
) -> dict:
    """``{"plain": compare(...), "<mode>": compare(...) per mode with the memory}``."""

    out = {"plain": compare(torch_run(torch_model, ids), mlx_run(mlx_model, ids))}
    if memory is None:
        return out
    t_mem, m_mem = Memory.load(memory), MlxMemory.load(memory)
    base = config or KNNConfig.from_memory_defaults(m_mem.retrieval)
    for mode in modes:
        cfg = base.updated(mix=mode, search="exact")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # router-weight notes: main prints the hashes
            attach(torch_model, t_mem, cfg)
            mlx_attach(mlx_model, m_mem, cfg)
        try:
            out[mode] = compare(torch_run(torch_model, ids), mlx_run(mlx_model, ids))
        finally:
            detach(torch_model)
            mlx_detach(mlx_model)
    return out


def format_report(results: dict) -> str:
    lines = []
    for name, r in results.items():
        title = "plain models" if name == "plain" else f"memory, mix={name}"
        lines.append(
            f"{title}: logits rel. error {r['logits_error']:.2e}, next-token top-1 agreement "
            f"{r['top1']:.1%}, top-5 agreement {r['top5']:.1%}"
        )
        if name == "plain":
            lines.append(f"  {'layer':>5}  {'experts agree':>13}  {'router logits err':>17}")
            for i, layer in r["layers"].items():
                lines.append(f"  {i:>5}  {layer['experts']:>13.1%}  {layer['router_error']:>17.2e}")
        else:
            lines.append(
                f"  {'layer':>5}  {'experts agree':>13}  {'lambda torch':>12}  {'lambda mlx':>10}"
            )
            for i, layer in r["layers"].items():
                lines.append(
                    f"  {i:>5}  {layer['experts']:>13.1%}  {layer['lambda_torch']:>12.4f}  "
                    f"{layer['lambda_mlx']:>10.4f}"
                )
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------
def _mlx_model(args, tmp: Path):
    path = args.mlx_model
    if path is None:
        path = convert_model(args.model, tmp / "mlx", dtype=args.dtype, log=lambda _: None)
    model = mlx_load(str(path))[0]
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    target = mx.float32 if on_cpu else getattr(mx, args.dtype)

    def cast(w):
        return w.astype(target) if mx.issubdtype(w.dtype, mx.floating) else w

    model.update(tree_map(cast, model.parameters()))
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_knnmoe.pytorch.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="transformers checkpoint (directory or id)")
    p.add_argument("--mlx-model", default=None, help="its MLX conversion (default: convert now)")
    p.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:1, auto")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--memory", default=None, help="a memory file to compare with, per mix mode")
    p.add_argument("--mix", action="append", choices=MIX_MODES, help="modes (default: all)")
    p.add_argument("--knn-k", type=int, default=None)
    p.add_argument("--similarity", choices=SIMILARITIES, default=None)
    p.add_argument("--text", default=PROBE, help="probe text")
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args(argv)
    torch_model, tokenizer = load_model(args.model, args.device, args.dtype)
    ids = np.array([tokenizer(args.text)["input_ids"][: args.max_tokens]])
    config = None
    if args.memory is not None:
        retrieval = MlxMemory.load(args.memory).retrieval
        config = KNNConfig.from_memory_defaults(retrieval, k=args.knn_k, similarity=args.similarity)
    with tempfile.TemporaryDirectory() as tmp:
        mlx_model = _mlx_model(args, Path(tmp))
        mlx_hashes = mlx_fingerprint(mlx_model)["router_hash"]
        modes = tuple(args.mix or MIX_MODES)
        results = run_parity(torch_model, mlx_model, ids, args.memory, modes, config)
    device = next(torch_model.parameters()).device
    print(f"{args.model}: {ids.shape[1]} probe tokens, torch on {device} ({args.dtype})")
    same = fingerprint(torch_model)["router_hash"] == mlx_hashes
    print(f"router weights hash equal on both sides: {'yes' if same else 'no'}")
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
