"""Train the small bundled MoE (mlx-lm ``qwen3_moe``) on the generated letter-cipher tasks.

    python examples/bundled/train.py --out mlx_knnmoe/bundled/model

Deterministic for a fixed --seed (data stream, initialisation, batch order). Prints progress
(loss, tokens/s, ETA) and, at the end, accuracy per register and format on the test splits and
the share of each task's answer tokens routed to each expert (expert specialisation).

The training stream (generate_data.training_stream, seeded) mixes both record formats; a
fraction --shift-fraction of the examples use the shifted register's cue words. The loss is
the next-token NLL of the answer tokens only (the completion, or the answer letter), plus a
small load-balancing term on the router probabilities (Switch Transformer style) so that
every expert is used.

Routing hint: left alone, a model this small does not split the tasks between experts (its
experts end up shared by all tasks). From step --hint-from on, a term
-log P(router picks one of task t's experts) on the original register's text rows, in layers
--supervise-layers, makes experts {t, t + 8} of those layers specialise in task t. The
shifted register and the multiple-choice rows never get the hint, so the router learns their
routing only through the language-model loss, from the few shifted examples it sees. Starting
the hint late lets the multiple-choice skill form first (with the hint from step 0 it did not
form within 5000 steps).

Runs on MLX's CPU back end as well as on Apple GPUs. On Linux, MLX's CPU matmul is slow;
preloading MKL speeds it up several times (optional):
    LD_PRELOAD=$VENV/lib/libmkl_rt.so.3 MKL_THREADING_LAYER=SEQUENTIAL python ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_data as G  # noqa: E402
from tokenizer import save_tokenizer  # noqa: E402


def model_config(args, vocab_size: int) -> dict:
    return {
        "model_type": "qwen3_moe",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": 2 * args.hidden,  # unused: every layer is an MoE layer
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.hidden // args.heads,
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": args.expert_size,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


# ------------------------------------------------------------------------------ encoding


class Encoder:
    """Records -> (token ids, index where the answer starts), as mlx_knnmoe renders them."""

    def __init__(self, tokenizer):
        from mlx_knnmoe.data.examples import encode_pair
        from mlx_knnmoe.data.formats import multiple_choice

        self.tok = tokenizer
        self._pair = encode_pair
        self._mc = multiple_choice
        self.letter_ids = [self.single(" " + x) for x in "ABCD"]

    def single(self, text: str) -> int:
        ids = self.tok.encode(text)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    def pair(self, record: dict) -> tuple[list[int], list[int]]:
        if "prompt" in record:
            return self._pair(self.tok, record["prompt"], record["completion"])
        mc = self._mc(record, "mmlu")
        return self._pair(self.tok, mc.prompt, mc.choices[mc.gold])


def make_batch(pairs: list[tuple[list[int], list[int]]], tasks: list[int] | None = None):
    length = max(len(p) + len(c) for p, c in pairs)
    tokens = np.zeros((len(pairs), length), dtype=np.int32)
    mask = np.zeros((len(pairs), length), dtype=np.float32)
    for b, (p, c) in enumerate(pairs):
        tokens[b, : len(p) + len(c)] = p + c
        mask[b, len(p) : len(p) + len(c)] = 1
    if tasks is None:
        return mx.array(tokens), mx.array(mask)
    return mx.array(tokens), mx.array(mask), mx.array(tasks, dtype=mx.int32)


# -------------------------------------------------------------------- router bookkeeping


class RecordingGate(nn.Module):
    """Wraps a router during training, keeping its logits for the balance loss (verify.py:
    what a gate, kNN-wrapped or not, returns: the logits the block routes on)."""

    def __init__(self, inner: nn.Linear, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_sink", sink)

    def __call__(self, x):
        z = self.inner(x)
        self._sink.append(z)
        return z


def wrap_gates(model, sink: list) -> None:
    for layer in model.layers:
        layer.mlp.gate = RecordingGate(layer.mlp.gate, sink)


def unwrap_gates(model) -> None:
    for layer in model.layers:
        if isinstance(layer.mlp.gate, RecordingGate):
            layer.mlp.gate = layer.mlp.gate.inner


def balance_loss(logits: mx.array, mask: mx.array, k: int) -> mx.array:
    """N * sum_i f_i P_i over real tokens: f_i share of top-k slots, P_i mean probability."""
    n = logits.shape[-1]
    p = mx.softmax(logits.astype(mx.float32), axis=-1).reshape(-1, n)
    m = mask.reshape(-1, 1)
    top = mx.argpartition(-p, kth=k - 1, axis=-1)[:, :k]
    chosen = (mx.arange(n)[None, None, :] == top[..., None]).any(axis=1).astype(mx.float32)
    count = mx.maximum(m.sum(), 1.0)
    f = mx.stop_gradient((chosen * m).sum(0) / (count * k))
    pm = (p * m).sum(0) / count
    return n * (f * pm).sum()


def route_loss(logits: mx.array, real: mx.array, tasks: mx.array, n: int) -> mx.array:
    """Optional hint: -log P(task's own experts) for original-register rows (tasks >= 0).

    Task t owns experts {t, t + T, t + 2T, ...} (T tasks); shifted rows (-1) get no hint."""
    p = mx.softmax(logits.astype(mx.float32), axis=-1)  # [B, L, N]
    owner = mx.arange(n)[None, :] % G.NUM_TASKS == tasks[:, None]  # [B, N]
    mass = (p * owner[:, None, :]).sum(-1)
    m = real * (tasks >= 0)[:, None]
    return -(mx.log(mx.maximum(mass, 1e-9)) * m).sum() / mx.maximum(m.sum(), 1.0)


# ---------------------------------------------------------------------------- evaluation


def evaluate(model, enc: Encoder, records: list[dict], batch: int = 256) -> dict:
    """Teacher-forced answer NLL/accuracy; MC accuracy from the answer-letter logits."""
    correct, nll, ntok, exact = 0, 0.0, 0, 0
    for i in range(0, len(records), batch):
        recs = records[i : i + batch]
        pairs = [enc.pair(r) for r in recs]
        tokens, mask = make_batch(pairs)
        logits = model(tokens[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        m = mask[:, 1:]
        nll += float((ce * m).sum())
        ntok += int(m.sum())
        right = (logits.argmax(-1) == tokens[:, 1:]).astype(mx.float32)
        exact += int((((right * m).sum(-1)) == m.sum(-1)).sum())
        if "question" in recs[0]:
            last = mx.array([len(p) - 1 for p, _ in pairs])
            letters = logits[mx.arange(len(recs)), last][:, enc.letter_ids]
            gold = mx.array([r["answer"] for r in recs])
            correct += int((letters.argmax(-1) == gold).sum())
    out = {"nll": nll / max(ntok, 1), "exact": exact / len(records)}
    if "question" in records[0]:
        out["acc"] = correct / len(records)
    return out


def expert_usage(model, enc: Encoder, records: list[dict], n_experts: int) -> dict:
    """Share of answer-predicting positions (per task, per layer) that select each expert."""
    sink: list = []
    wrap_gates(model, sink)
    k = model.layers[0].mlp.top_k
    usage = {}
    try:
        for task in G.ORIGINAL:
            recs = [r for r in records if r["task"] == task]
            pairs = [enc.pair(r) for r in recs]
            tokens, mask = make_batch(pairs)
            sink.clear()
            mx.eval(model(tokens[:, :-1]))
            m = np.array(mask[:, 1:]).reshape(-1) > 0
            per_layer = []
            for z in sink:
                z = np.array(z.astype(mx.float32)).reshape(-1, n_experts)[m]
                top = np.argsort(-z, axis=-1)[:, :k]
                counts = np.bincount(top.reshape(-1), minlength=n_experts) / (len(z) * k)
                per_layer.append(counts.round(3).tolist())
            usage[task] = per_layer
    finally:
        unwrap_gates(model)
    return usage


def print_usage(usage: dict, layer: int) -> None:
    n = len(next(iter(usage.values()))[layer])
    print(f"  layer {layer}: share of answer positions routed to each expert (x100)")
    print("  " + f"{'task':<6}" + "".join(f"{e:>4}" for e in range(n)))
    for task, per_layer in usage.items():
        print("  " + f"{task:<6}" + "".join(f"{round(100 * v):>4}" for v in per_layer[layer]))


# ------------------------------------------------------------------------------ training


def batches(stream, enc: Encoder, batch_size: int, supervise: str, counts: Counter):
    """Batches of one format each (text prompts are ~3x shorter than MC prompts)."""
    pending = {"text": [], "mc": []}
    for record in stream:
        kind = "mc" if "question" in record else "text"
        counts[f"{record['register']}_{kind}"] += 1
        hint = record["register"] == "orig" and (supervise == "all" or kind == supervise)
        task = G.ORIGINAL.index(record["task"]) if hint else -1
        pending[kind].append((enc.pair(record), task))
        if len(pending[kind]) == batch_size:
            pairs, tasks = zip(*pending[kind])
            yield make_batch(list(pairs), list(tasks))
            pending[kind] = []


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the bundled kNN-MoE demo model.")
    ap.add_argument("--out", default="mlx_knnmoe/bundled/model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0, help="generate_data.py --seed")
    ap.add_argument("--ref", type=int, default=800, help="as given to generate_data.py")
    ap.add_argument("--test", type=int, default=400, help="as given to generate_data.py")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--balance", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument(
        "--route-supervision",
        type=float,
        default=0.1,
        help="weight of the routing hint on original-register rows (0: off)",
    )
    ap.add_argument(
        "--supervise",
        choices=["all", "text", "mc"],
        default="text",
        help="which record formats get the routing hint",
    )
    ap.add_argument(
        "--supervise-layers", default="1,2", help="comma-separated layers with the hint"
    )
    ap.add_argument("--hint-from", type=int, default=2500, help="steps before the hint starts")
    ap.add_argument("--shift-fraction", type=float, default=0.0006)
    ap.add_argument("--mc-fraction", type=float, default=0.6)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        sys.exit(f"{out} is not empty; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(out, list(G.ORIGINAL + G.SHIFTED))
    vocab_size = (vocab + 7) // 8 * 8
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    enc = Encoder(tok)

    from mlx_lm.models import qwen3_moe

    config = model_config(args, vocab_size)
    mx.random.seed(args.seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"qwen3_moe: {n_params / 1e6:.2f}M parameters, vocab {vocab_size}", flush=True)

    splits = G.reserved_strings(args.data_seed, args.ref, args.test)
    evalsets = {}
    for name, strings in splits.items():
        register, split, fmt = name.split("_")
        if split == "test":
            evalsets[f"{register}_{fmt}"] = G.eval_split(
                register, fmt, strings, args.data_seed, name
            )
    reserved = {s for v in splits.values() for s in v}
    stream = G.training_stream(args.seed, args.shift_fraction, args.mc_fraction, reserved)

    sink: list = []
    wrap_gates(model, sink)
    supervised_layers = (
        [int(i) for i in args.supervise_layers.split(",")]
        if args.supervise_layers
        else list(range(args.layers))
    )

    def loss_fn(model, tokens, mask, tasks):
        sink.clear()
        logits = model(tokens[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        m = mask[:, 1:]
        lm = (ce * m).sum() / m.sum()
        real = (tokens[:, :-1] != 0).astype(mx.float32)
        bal = sum(balance_loss(z, real, args.top_k) for z in sink) / len(sink)
        loss = lm + args.balance * bal
        if args.route_supervision and hint_on:
            hinted = [sink[i] for i in supervised_layers]
            sup = sum(route_loss(z, real, tasks, args.experts) for z in hinted) / len(hinted)
            loss = loss + args.route_supervision * sup
        return loss, (lm, bal)

    warmup = min(args.warmup, args.steps // 10)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-6, args.lr, warmup),
            optim.cosine_decay(args.lr, args.steps - warmup, args.lr * 0.05),
        ],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    hint_on = args.hint_from == 0
    step_fn = nn.value_and_grad(model, loss_fn)
    started = time.perf_counter()
    seen_tokens, lm_avg, bal_avg = 0, None, None
    counts: Counter = Counter()
    for step, (tokens, mask, tasks) in enumerate(
        batches(stream, enc, args.batch, args.supervise, counts), 1
    ):
        if step == args.hint_from + 1 and not hint_on:
            hint_on = True
            step_fn = nn.value_and_grad(model, loss_fn)
        (_, (lm, bal)), grads = step_fn(model, tokens, mask, tasks)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, lm, bal)
        seen_tokens += tokens.size
        lm_avg = float(lm) if lm_avg is None else 0.98 * lm_avg + 0.02 * float(lm)
        bal_avg = float(bal) if bal_avg is None else 0.98 * bal_avg + 0.02 * float(bal)
        if step % 50 == 0 or step == args.steps:
            el = time.perf_counter() - started
            eta = el / step * (args.steps - step)
            print(
                f"step {step:>5}/{args.steps}  answer nll {lm_avg:.3f}  balance {bal_avg:.3f}  "
                f"{seen_tokens / el:,.0f} tok/s  elapsed {el:.0f}s  eta {eta:.0f}s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            unwrap_gates(model)
            res = {k: evaluate(model, enc, v) for k, v in evalsets.items()}
            wrap_gates(model, sink)
            print("  eval " + "  ".join(f"{k}: {_fmt(v)}" for k, v in res.items()), flush=True)
        if step == args.steps:
            break
    seconds = time.perf_counter() - started
    unwrap_gates(model)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    results = {k: evaluate(model, enc, v) for k, v in evalsets.items()}
    usage = expert_usage(model, enc, evalsets["orig_text"], args.experts)
    usage_shift = expert_usage(model, enc, evalsets["shift_text"], args.experts)
    print(f"trained {args.steps} steps in {seconds:.0f}s; training examples: {dict(counts)}")
    for k, v in results.items():
        print(f"  {k}: {_fmt(v)}")
    for layer in range(args.layers):
        print_usage(usage, layer)
    print("shifted register (same tasks):")
    for layer in range(args.layers):
        print_usage(usage_shift, layer)
    log = {
        "args": vars(args),
        "seconds": round(seconds, 1),
        "parameters": n_params,
        "test": results,
        "expert_usage_orig_text": usage,
        "expert_usage_shift_text": usage_shift,
        "training_examples": dict(counts),
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1))


def _fmt(r: dict) -> str:
    s = f"nll {r['nll']:.3f} exact {r['exact']:.3f}"
    return s + (f" acc {r['acc']:.3f}" if "acc" in r else "")


if __name__ == "__main__":
    main()
