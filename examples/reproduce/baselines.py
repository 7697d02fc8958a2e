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

C3PO-style re-mixing (``c3po_arrays``; after arXiv 2504.07964, simplified): the reference
prompts the plain model solves (its greedy completion equals the gold one, checked by
teacher forcing: the argmax prediction at every answer position is the gold token; for a
multiple-choice reference file, the gold choice scores best) are stored with their prompt
embedding and, per MoE layer, the dense softmax of the router logits at their last prompt
token. An evaluated sequence is embedded the same way, its ``n_neighbours`` most
cosine-similar solved reference prompts are found, and the mean of their routing
distributions replaces the router output in every MoE layer for every token of that
sequence (the block still applies its own top-k selection and renormalisation), or with
``tokens="last"`` (``--modes c3po-last``) only at its last prompt token, the position whose
routing the references supply (C3PO's ablations reportedly favour re-mixing the last token
only). C3PO embeds prompts with a sentence-embedding model; none is available offline, so
the embedding here is the mean over the prompt tokens of the model's own final hidden states
(after the final norm). Not implemented: C3PO's kernel weighting of the neighbours, its
interpolation with the sample's own routing, its neighbourhood gradient descent, and its
restriction to critical layers and core experts; this is plain k-NN averaging in all layers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_knnmoe import detach
from mlx_knnmoe.arch import get_path, moe_layers, set_path, spec_for
from mlx_knnmoe.batches import length_groups, make_batch
from mlx_knnmoe.data import (
    MC_FORMATS,
    Example,
    MultipleChoice,
    detect_format,
    encode_pair,
    load_dataset,
    multiple_choice,
    read_records,
)
from mlx_knnmoe.router import routing_map
from mlx_knnmoe.scoring import score_choices, score_text

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
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Adam on the answer loss of ``examples`` for ``steps`` steps; returns the step losses.

    Batches follow a seeded permutation of the examples, renewed each epoch (the last batch
    of an epoch may be smaller). ``on_step(step)`` runs every ``every`` steps (held-out
    scoring while tuning)."""
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
            loss, grads = loss_and_grad(model, batch.tokens, batch.loss_mask)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            losses.append(loss.item())
            if on_step is not None and every and step % every == 0:
                model.eval()
                on_step(step)
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
) -> dict:
    """Fine-tune ``model`` in place on the answer tokens of the reference split (plus as
    many examples of ``replay``, original-domain data against forgetting, when given).

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
    examples = load_dataset(ref_path, tokenizer, "completion", shuffle=False).examples
    if replay is not None:
        extra = load_dataset(replay, tokenizer, "completion", shuffle=False).examples
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


# ------------------------------------------------------------------------------- C3PO-style


class _RecordingGate(nn.Module):
    """Passes the router through and keeps its logits."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = sink

    def __call__(self, x: mx.array) -> mx.array:
        z = self.inner(x)
        self._sink.append(z)
        return z


class _FixedGate(nn.Module):
    """Returns the logits of a fixed routing distribution at every position, or only at
    ``position`` (the router's own logits elsewhere)."""

    def __init__(self, inner: nn.Module, logits: mx.array, position: int | None = None):
        super().__init__()
        self.inner = inner
        self._logits = logits  # [N]
        self._position = position

    def __call__(self, x: mx.array) -> mx.array:
        n = self._logits.shape[-1]
        fixed = mx.broadcast_to(self._logits, (*x.shape[:-1], n)).astype(x.dtype)
        if self._position is None:
            return fixed
        at = (mx.arange(x.shape[-2]) == self._position)[:, None]
        return mx.where(at, fixed, self.inner(x))


@contextmanager
def _gates(model: nn.Module, make: Callable[[int, nn.Module], nn.Module]) -> Iterator[None]:
    """Replace every MoE block's gate by ``make(layer, gate)``; restore the originals after."""
    detach(model)
    spec = spec_for(model)
    if spec.gate_returns != "logits":
        raise ValueError("C3PO-style re-mixing needs a gate that returns router logits")
    blocks = moe_layers(model)
    originals = {layer: get_path(block, spec.gate) for layer, block in blocks.items()}
    try:
        for layer, block in blocks.items():
            set_path(block, spec.gate, make(layer, originals[layer]))
        yield
    finally:
        for layer, block in blocks.items():
            set_path(block, spec.gate, originals[layer])


def _groups(lengths: list[int]) -> list[list[int]]:
    return length_groups(lengths, 4096)


def prompt_embeddings(model: nn.Module, prompts: list[list[int]]) -> np.ndarray:
    """[n, d]: mean of the model's final hidden states over each prompt's tokens."""
    out = None
    examples = [Example(p, [0] * len(p), "") for p in prompts]
    for group in _groups([len(p) for p in prompts]):
        batch = make_batch(examples, group)
        h = model.model(batch.tokens).astype(mx.float32)
        n = mx.array([len(prompts[i]) for i in group])
        mask = (mx.arange(h.shape[1])[None, :] < n[:, None]).astype(mx.float32)
        if out is None:
            out = np.zeros((len(prompts), h.shape[-1]), dtype=np.float32)
        out[group] = np.array((h * mask[..., None]).sum(axis=1) / n[:, None])
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _mc_prompt(tokenizer, item: MultipleChoice) -> list[int]:
    return encode_pair(tokenizer, item.prompt, item.choices[0])[0]


def _text_prompt(example: Example) -> list[int]:
    first = example.loss_mask.index(1) if 1 in example.loss_mask else len(example.tokens)
    return example.tokens[:first]


@dataclass
class C3POReference:
    """The solved reference prompts: embeddings [m, d] and routing [m, layers, N]."""

    embeddings: np.ndarray
    routing: np.ndarray
    layers: list[int]
    total: int  # reference examples before keeping the solved ones


def c3po_reference(model: nn.Module, tokenizer, ref_path: str | Path) -> C3POReference:
    """Embed the reference prompts the plain model solves and record their routing at the
    last prompt token (the dense softmax over experts of the router logits, per MoE layer)."""
    records = list(read_records(ref_path))
    fmt = detect_format(records[0][1]) if records else "completion"
    if fmt in MC_FORMATS:
        items = [multiple_choice(r, fmt) for _, r in records]
        solved = score_choices(model, tokenizer, items).acc > 0
        prompts = [_mc_prompt(tokenizer, it) for it in items]
        seqs = prompts
    else:
        examples = load_dataset(ref_path, tokenizer, "completion", shuffle=False).examples
        prompts = [_text_prompt(e) for e in examples]
        seqs = [e.tokens for e in examples]
        solved = np.zeros(len(examples), dtype=bool)
    spec = spec_for(model)
    layers = sorted(moe_layers(model))
    maps = {layer: routing_map(spec, moe_layers(model)[layer]) for layer in layers}
    n_exp = maps[layers[0]].n_experts
    routing = np.zeros((len(prompts), len(layers), n_exp), dtype=np.float32)
    sinks: dict[int, list] = {layer: [] for layer in layers}
    seq_examples = [Example(s, [0] * len(s), "") for s in seqs]
    with _gates(model, lambda layer, gate: _RecordingGate(gate, sinks[layer])):
        for group in _groups([len(s) for s in seqs]):
            for sink in sinks.values():
                sink.clear()
            batch = make_batch(seq_examples, group)
            logits = model(batch.tokens)
            last = mx.array([len(prompts[i]) - 1 for i in group])
            rows = mx.arange(len(group))
            for j, layer in enumerate(layers):
                z = sinks[layer][0][rows, last]
                routing[group, j] = np.array(maps[layer].scores(z))
            if fmt not in MC_FORMATS:
                pred = np.array(logits.argmax(axis=-1))
                for b, i in enumerate(group):
                    e = examples[i]
                    pos = [t for t, m in enumerate(e.loss_mask) if m]
                    solved[i] = all(pred[b, t - 1] == e.tokens[t] for t in pos)
    keep = np.flatnonzero(solved)
    emb = prompt_embeddings(model, [prompts[i] for i in keep])
    return C3POReference(emb, routing[keep], layers, len(prompts))


def _neighbour_routing(ref: C3POReference, emb: np.ndarray, n_neighbours: int) -> np.ndarray:
    """[n, layers, N]: mean routing of each row's most cosine-similar solved references."""
    if len(ref.embeddings) == 0:
        raise ValueError("the plain model solves none of the reference prompts")
    k = min(n_neighbours, len(ref.embeddings))

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    sims = unit(emb) @ unit(ref.embeddings).T
    nearest = np.argsort(-sims, axis=-1, kind="stable")[:, :k]
    return ref.routing[nearest].mean(axis=1)


def c3po_arrays(
    model: nn.Module,
    tokenizer,
    ref_path: str | Path,
    items: list[MultipleChoice] | None = None,
    examples: list[Example] | None = None,
    n_neighbours: int = 3,
    reference: C3POReference | None = None,
    tokens: str = "all",
) -> dict:
    """Per-example arrays of the C3PO-style baseline, as ``evaluate_variant(...)["arrays"]``:
    acc, acc_norm, prompt_nll for multiple-choice ``items``; else nll, targets, prompt_nll
    for text ``examples``. ``reference`` (from ``c3po_reference``) skips rebuilding it.
    ``tokens``: the neighbours' routing replaces the router at ``all`` tokens of the
    sequence, or only at the ``last`` prompt token (the position the references supply)."""
    if items is None and examples is None:
        raise ValueError("pass items (multiple choice) or examples (text)")
    if tokens not in ("all", "last"):
        raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
    detach(model)
    ref = reference or c3po_reference(model, tokenizer, ref_path)
    if items is not None:
        prompts = [_mc_prompt(tokenizer, it) for it in items]
    else:
        prompts = [_text_prompt(e) for e in examples]
    mixed = _neighbour_routing(ref, prompt_embeddings(model, prompts), n_neighbours)
    spec = spec_for(model)
    blocks = moe_layers(model)
    inverse = {layer: routing_map(spec, blocks[layer]).inverse for layer in ref.layers}
    n = len(prompts)
    if items is not None:
        acc, acc_norm, prompt_nll = np.zeros(n), np.zeros(n), np.zeros(n)
    else:
        nll, targets = np.zeros(n), np.zeros(n)
    for i in range(n):
        logits = {
            layer: inverse[layer](mx.array(mixed[i, j])) for j, layer in enumerate(ref.layers)
        }
        at = len(prompts[i]) - 1 if tokens == "last" else None

        def make(layer: int, gate: nn.Module, lg: dict = logits, at: int | None = at):
            return _FixedGate(gate, lg[layer], at)

        with _gates(model, make):
            if items is not None:
                s = score_choices(model, tokenizer, [items[i]])
                acc[i], acc_norm[i], prompt_nll[i] = s.acc[0], s.acc_norm[0], s.prompt_nll[0]
            else:
                a, t = score_text(model, [examples[i]])
                nll[i], targets[i] = a[0], t[0]
    if items is not None:
        return {"acc": acc, "acc_norm": acc_norm, "prompt_nll": prompt_nll}
    return {"nll": nll, "targets": targets, "prompt_nll": nll / np.maximum(targets, 1)}


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
    from mlx_knnmoe.evaluate import evaluate_variant

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
