"""Train the natural-text benchmark's small qwen3_moe in PyTorch (transformers), then convert
it to MLX with ``python -m mlx_knnmoe convert`` (the path a user with a Hub checkpoint takes).

    python examples/natural_text/train.py --data examples/natural_text/data \
        --out examples/natural_text/model

Writes ``<out>/hf`` (tokenizer and PyTorch checkpoint) and ``<out>/mlx`` (the converted model).
Deterministic for a fixed --seed on one machine (tokenizer, initialisation, batch order;
single-threaded torch). The tokenizer is a byte-level BPE trained with ``tokenizers`` on the
training text. The loss is next-token NLL on random windows of the training text plus
transformers' load-balancing term (``router_aux_loss_coef``). Prints loss, tokens/s and ETA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def model_config(args, vocab_size: int, eos_id: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=args.seq_len * 2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        output_router_logits=True,
        router_aux_loss_coef=args.balance,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    text = Path(args.data, "train.txt").read_text()
    if args.max_chars:
        text = text[: args.max_chars]
    tokenizer = train_tokenizer(text, args.vocab)
    ids = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
    config = model_config(args, len(tokenizer), tokenizer.eos_token_id)
    model = Qwen3MoeForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    model.train()
    start, tokens, losses = time.perf_counter(), 0, []
    for step in range(args.steps):
        starts = rng.integers(0, len(ids) - args.seq_len - 1, args.batch)
        batch = torch.from_numpy(np.stack([ids[s : s + args.seq_len] for s in starts]))
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += batch.numel()
        losses.append(out.loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            took = time.perf_counter() - start
            eta = took / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1}/{args.steps} loss {np.mean(losses[-args.log_every :]):.3f} "
                f"{tokens / took:.0f} tok/s eta {eta:.0f}s",
                flush=True,
            )
    hf = Path(args.out, "hf")
    model.config.output_router_logits = False
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    info = {
        "steps": args.steps,
        "train_tokens": int(len(ids)),
        "tokens_seen": tokens,
        "final_loss": float(np.mean(losses[-args.log_every :])),
        "seconds": round(time.perf_counter() - start, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "args": vars(args),
        # the tokenizer's merges depend on the library version: a rerun says what differs
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, tokenizers)},
        "train_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    (hf / "training.json").write_text(json.dumps(info, indent=1))
    return info


def convert(out: Path) -> None:
    """``python -m mlx_knnmoe convert`` to ``<out>/mlx``, with the training record beside it."""
    cmd = [sys.executable, "-m", "mlx_knnmoe", "convert", "--hf-path", str(out / "hf")]
    cmd += ["--mlx-path", str(out / "mlx"), "--dtype", "float32", "--force"]
    subprocess.run(cmd, check=True)
    (out / "mlx" / "training.json").write_text((out / "hf" / "training.json").read_text())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=128)
    ap.add_argument("--balance", type=float, default=0.01)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=None, help="train on a prefix (smoke)")
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    print(json.dumps({k: v for k, v in train(a).items() if k != "args"}))
    convert(Path(a.out))
