"""Baselines that kNN-MoE is compared against, on the bundled model.

    python examples/reproduce/baselines.py          # all four baselines on the four test splits
    python examples/reproduce/baselines.py --tune   # the held-out scan behind the defaults

Every baseline adapts with the same data as kNN-MoE: the shifted reference split
(``shift_ref_text.jsonl``, 800 prompt/completion examples).

Fine-tuning (``finetune``), in place, on the answer-token loss (the completion tokens, as
``mlx_knnmoe.data`` masks them), Adam with a constant learning rate, batches of 32 drawn
from a seeded shuffle of the examples (a fresh shuffle each epoch):

* ``router``: only the router (``gate``) weights of every MoE block train, the paper's
  router-only fine-tuning baseline.
* ``full``: every weight trains.
* ``lora``: mlx-lm's LoRA adapters (``mlx_lm.tuner.utils.linear_to_lora_layers``, rank 8,
  scale 20, no dropout: mlx-lm's defaults) on every layer's linears mlx-lm converts by
  default, which for qwen3_moe are the attention projections, the router and the experts'
  SwitchLinears; only the adapters train.

Hyperparameters (``DEFAULTS``) were chosen with ``--tune --epochs 30``: each mode trains on
the first 90% of the reference split (720 examples, 23 batches per epoch), the held-out last
10% (80 examples) is scored after every epoch, and over the grid (``GRIDS``: lr 1e-3..3e-2 for
the router, 3e-4..3e-3 for full and LoRA; 1..30 epochs) the setting with the fewest epochs
whose held-out answer NLL per token is within 0.01 nats of the grid's best wins (closer than
1% perplexity counts as a tie, so the cheaper run is taken). No test split was looked at; the
original register was not looked at either. Batch size 32 and LoRA rank/scale were not
tuned. The final models train on all 800 examples for the chosen number of epochs (25
batches each). Held-out NLL (plain model: 1.037):

    router  lr 1e-2, 23 epochs: 0.433 (best 0.433; lr 3e-3 0.450, 1e-3 0.484, 3e-2 0.605)
    full    lr 3e-4,  3 epochs: 0.007 (best 0.0001; every lr is below 0.0005 from epoch 13)
    lora    lr 3e-4,  3 epochs: 0.003 (best 0.0002; lr 3e-3 diverges to about 3.2)

C3PO-style re-mixing: ``c3po.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from c3po import c3po_arrays, c3po_reference
from mlx.utils import tree_flatten

from mlx_knnmoe import detach
from mlx_knnmoe.arch.specs import get_path, moe_layers, spec_for
from mlx_knnmoe.data.batches import make_batch
from mlx_knnmoe.data.examples import Example, load_dataset
from mlx_knnmoe.data.formats import multiple_choice
from mlx_knnmoe.data.records import read_records
from mlx_knnmoe.evaluation.scoring import score_text

MODES = ("router", "full", "lora")
# chosen by ``--tune`` (see the module docstring); steps = epochs x batches per epoch
DEFAULTS: dict[str, dict] = {
    "router": {"lr": 1e-2, "epochs": 23, "batch_size": 32},
    "full": {"lr": 3e-4, "epochs": 3, "batch_size": 32},
    "lora": {"lr": 3e-4, "epochs": 3, "batch_size": 32},
}
GRIDS = {"router": (1e-3, 3e-3, 1e-2, 3e-2), "full": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3)}
TOLERANCE = 0.01  # nats per answer token (1% perplexity): closer to the best counts as a tie
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx-lm's default LoRA parameters
SPLITS = ("shift_test_text", "orig_test_text", "shift_test_mc", "orig_test_mc")


# ------------------------------------------------------------------------------ fine-tuning


def answer_loss(model: nn.Module, tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """Mean cross-entropy over the masked (answer) tokens of a padded batch."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    mask = loss_mask[:, 1:]
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1)


def answer_nll(model: nn.Module, examples: list[Example]) -> float:
    """Mean NLL per answer token of ``examples`` (the model as it is)."""
    nll, targets = score_text(model, examples)
    return float(nll.sum() / max(targets.sum(), 1.0))


def prepare(model: nn.Module, mode: str, seed: int = 0) -> int:
    """Freeze ``model`` except what ``mode`` trains (adding LoRA adapters for ``lora``);
    returns the number of trainable parameters."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    detach(model)  # kNN-MoE router wrappers must not be trained or wrapped
    if mode == "full":
        model.unfreeze()
    elif mode == "router":
        model.freeze()
        gate = spec_for(model).gate
        for block in moe_layers(model).values():
            get_path(block, gate).unfreeze()
    else:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        mx.random.seed(seed)  # the adapters' initialisation
        linear_to_lora_layers(model, len(model.layers), dict(LORA))
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def train(
    model: nn.Module,
    examples: list[Example],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    every: int = 0,
    on_step: Callable[[int], bool | None] | None = None,
) -> list[float]:
    """Adam on the answer loss of ``examples`` for ``steps`` steps; returns the step losses.

    Batches follow a seeded permutation of the examples, renewed each epoch (the last batch
    of an epoch may be smaller). ``on_step(step)`` runs every ``every`` steps (held-out
    scoring while tuning); training stops early when it returns True."""
    rng = np.random.default_rng(seed)
    opt = optim.Adam(learning_rate=lr)
    loss_and_grad = nn.value_and_grad(model, answer_loss)
    batches: list[list[int]] = []
    losses = []
    model.train()
    try:
        for step in range(1, steps + 1):
            if not batches:
                order = rng.permutation(len(examples)).tolist()
                batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            batch = make_batch(examples, batches.pop(0))
            tokens, mask = mx.array(batch.tokens), mx.array(batch.loss_mask)  # NumPy batches
            loss, grads = loss_and_grad(model, tokens, mask)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            losses.append(loss.item())
            if on_step is not None and every and step % every == 0:
                model.eval()
                if on_step(step):
                    break
                model.train()
    finally:
        model.eval()
    return losses


def finetune(
    model: nn.Module,
    tokenizer,
    ref_path: str | Path,
    mode: str,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    replay: str | Path | None = None,
    fmt: str = "completion",
) -> dict:
    """Fine-tune ``model`` in place on the answer tokens of the reference split (plus as
    many examples of ``replay``, original-domain data against forgetting, when given), both
    files of record format ``fmt`` (``text``: every token but a window's first is a target).

    ``mode``: ``router`` (router weights only), ``full`` (all weights) or ``lora`` (mlx-lm
    LoRA adapters only). Unset ``steps``, ``lr``, ``batch_size`` take ``DEFAULTS[mode]``.
    Returns seconds (adapter set-up and training), steps, trainable_params, final_loss (the
    mean training loss of the last 10 steps), and the settings used.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = dict(DEFAULTS[mode])
    for key, value in (("lr", lr), ("batch_size", batch_size)):
        if value is not None:
            cfg[key] = value
    examples = load_dataset(ref_path, tokenizer, fmt, shuffle=False).examples
    if replay is not None:
        extra = load_dataset(replay, tokenizer, fmt, shuffle=False).examples
        examples = examples + extra[: len(examples)]
    per_epoch = -(-len(examples) // cfg["batch_size"])
    cfg["steps"] = steps if steps is not None else cfg["epochs"] * per_epoch
    tic = time.perf_counter()
    trainable = prepare(model, mode, seed)
    losses = train(model, examples, cfg["steps"], cfg["lr"], cfg["batch_size"], seed)
    return {
        "seconds": time.perf_counter() - tic,
        "steps": cfg["steps"],
        "trainable_params": int(trainable),
        "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "mode": mode,
        "lr": cfg["lr"],
        "batch_size": cfg["batch_size"],
        "examples": len(examples),
    }


# ------------------------------------------------------------------------------------- main


def _metric(arrays: dict) -> float:
    if "acc" in arrays:
        return float(arrays["acc"].mean())
    return float(arrays["nll"].sum() / max(arrays["targets"].sum(), 1.0))


def _load_split(path: Path, tokenizer):
    if path.name.endswith("_mc.jsonl"):
        return [multiple_choice(r, "mmlu") for _, r in read_records(path)], None
    return None, load_dataset(path, tokenizer, "completion", shuffle=False).examples


def _score(model, tokenizer, split) -> dict:
    from mlx_knnmoe.evaluation.compare import evaluate_variant

    items, examples = split
    return evaluate_variant(model, tokenizer, items, examples, 4096)["arrays"]


def tune(model_dir: Path, data_dir: Path, modes: list[str], seed: int, epochs: int) -> None:
    """Scan lr and epochs per mode: train on the first 90% of the shifted reference split,
    score answer NLL on the last 10% after every epoch; print the best setting per mode."""
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    examples = load_dataset(
        data_dir / "shift_ref_text.jsonl", tokenizer, "completion", shuffle=False
    ).examples
    cut = len(examples) - len(examples) // 10
    fit, heldout = examples[:cut], examples[cut:]
    bs = DEFAULTS["full"]["batch_size"]
    per_epoch = -(-len(fit) // bs)
    print(f"plain held-out NLL {answer_nll(model, heldout):.4f} ({len(heldout)} examples)")
    for mode in modes:
        found = []  # (held-out NLL, epochs, lr)
        for lr in GRIDS[mode]:
            model, tokenizer = load(str(model_dir))
            prepare(model, mode, seed)
            scores = []

            def record(step: int, model=model, scores=scores) -> None:
                scores.append((step, answer_nll(model, heldout)))

            tic = time.perf_counter()
            train(model, fit, epochs * per_epoch, lr, bs, seed, per_epoch, record)
            cells = " ".join(f"{v:.3f}" for _, v in scores)
            print(f"{mode:<7} lr {lr:g}: {cells}  ({time.perf_counter() - tic:.1f}s)", flush=True)
            found += [(value, step // per_epoch, lr) for step, value in scores]
        best = min(v for v, _, _ in found)
        near = [f for f in found if f[0] <= best + TOLERANCE]
        value, epochs_, lr = min(near, key=lambda f: (f[1], f[0]))
        print(
            f"{mode:<7} chosen: lr {lr:g}, {epochs_} epochs, held-out NLL {value:.4f} "
            f"(best {best:.4f})",
            flush=True,
        )


def main() -> None:
    """Run the fine-tuning baselines and C3PO-style re-mixing; print metrics per test split."""
    from mlx_lm import load

    from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument(
        "--modes",
        default="router,full,lora,c3po,c3po-last",
        help="c3po: neighbours' routing at every token; c3po-last: at the last prompt token.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbours", type=int, default=3)
    parser.add_argument("--tune", action="store_true", help="Run the held-out scan instead.")
    parser.add_argument("--epochs", type=int, default=10, help="With --tune: epochs scanned.")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.tune:
        tune(args.model, args.data, [m for m in modes if m in MODES], args.seed, args.epochs)
        return
    ref = args.data / "shift_ref_text.jsonl"
    started = time.perf_counter()
    model, tokenizer = load(str(args.model))
    splits = {s: _load_split(args.data / f"{s}.jsonl", tokenizer) for s in SPLITS}
    plain = {s: _metric(_score(model, tokenizer, sp)) for s, sp in splits.items()}
    print("metric: mean NLL per answer token (text), accuracy (mc)")
    print(f"{'baseline':<8} " + " ".join(f"{s:>22}" for s in SPLITS) + f"{'seconds':>9}")
    print(f"{'plain':<8} " + " ".join(f"{plain[s]:>22.4f}" for s in SPLITS))
    for mode in modes:
        if mode in ("c3po", "c3po-last"):
            tic = time.perf_counter()
            reference = c3po_reference(model, tokenizer, ref)
            where = "last" if mode == "c3po-last" else "all"
            scores = {
                s: _metric(
                    c3po_arrays(model, tokenizer, ref, *sp, args.neighbours, reference, where)
                )
                for s, sp in splits.items()
            }
            info = f"{len(reference.embeddings)}/{reference.total} reference prompts solved"
            again = {s: _metric(_score(model, tokenizer, sp)) for s, sp in splits.items()}
            if again != plain:
                info += "; WARNING: the plain model's scores changed afterwards"
        else:
            fresh, _ = load(str(args.model))
            tic = time.perf_counter()
            res = finetune(fresh, tokenizer, ref, mode, seed=args.seed)
            train_s = time.perf_counter() - tic
            scores = {s: _metric(_score(fresh, tokenizer, sp)) for s, sp in splits.items()}
            info = (
                f"lr {res['lr']:g}, {res['steps']} steps, {res['trainable_params']} params, "
                f"final loss {res['final_loss']:.4f}, training {train_s:.1f}s"
            )
        seconds = time.perf_counter() - tic
        cells = " ".join(f"{scores[s]:>10.4f} ({scores[s] - plain[s]:+.4f})" for s in SPLITS)
        print(f"{mode:<8} {cells}{seconds:>9.1f}   {info}", flush=True)
    print(f"total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
