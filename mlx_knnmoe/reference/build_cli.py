"""``python -m mlx_knnmoe.reference.build_cli``: build a memory with PyTorch (CPU or CUDA)
from a transformers checkpoint; the file loads in MLX (``mlx_knnmoe.generate --memory``).

    python -m mlx_knnmoe.reference.build_cli --model allenai/OLMoE-1B-7B-0125-Instruct \\
        --data medmcqa_train.jsonl --format medmcqa --out med.st --device cuda
"""

from __future__ import annotations

import argparse
import sys

from ..batches import KEEP
from ..build_cli import summary
from ..config import KNNConfig
from ..data import FORMATS
from ..mixing import MIX_MODES, SIMILARITIES
from ..tuning import DEFAULT_ETA_GRID
from .build import SCOPES
from .builder import build_memory
from .loading import DTYPES, load_model


def _eta(value: str) -> float | str:
    if value == "auto":
        return value
    eta = float(value)
    if eta <= 0:
        raise argparse.ArgumentTypeError(f"eta must be > 0, got {value}")
    return eta


def _grid(value: str) -> tuple[float, ...]:
    grid = tuple(float(v) for v in value.split(","))
    if not grid or min(grid) <= 0:
        raise argparse.ArgumentTypeError(f"every eta must be > 0, got {value!r}")
    return grid


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_knnmoe.reference.build_cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="transformers checkpoint (directory or id)")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: checkpoint's")
    p.add_argument("--eta", type=_eta, default="auto")
    p.add_argument("--eta-grid", type=_grid, default=DEFAULT_ETA_GRID)
    p.add_argument("--eta-patience", type=int, default=2, help="0: score the whole grid")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--scope", choices=SCOPES, default="sequence")
    p.add_argument(
        "--dense-surrogate",
        type=lambda v: v if v in ("auto", "off") else int(v),
        default="auto",
        help="k' for the gradient pass: a number, auto or off",
    )
    p.add_argument("--keep", choices=KEEP, default="all")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("--max-heldout", type=int, default=200)
    p.add_argument("--knn-k", type=int, default=None)
    p.add_argument("--similarity", choices=SIMILARITIES, default=None)
    p.add_argument("--mix", choices=MIX_MODES, default=None)
    p.add_argument("--lambda-scale", type=float, default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    config = KNNConfig().updated(
        k=args.knn_k, similarity=args.similarity, mix=args.mix, lambda_scale=args.lambda_scale
    )
    memory = build_memory(
        model,
        tokenizer,
        args.data,
        format=args.format,
        out=args.out,
        eta=args.eta,
        eta_grid=args.eta_grid,
        eta_patience=args.eta_patience or None,
        steps=args.steps,
        scope=args.scope,
        surrogate=args.dense_surrogate,
        keep=args.keep,
        max_examples=args.max_examples,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        batch_tokens=args.batch_tokens,
        heldout=args.heldout,
        max_heldout=args.max_heldout,
        config=config,
        force=args.force,
        progress=not args.quiet,
    )
    print(summary(memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
