"""Decode and prefill speed with a memory attached, as ratios to the plain model in the same
process: a random qwen3_moe-shaped model, and memories whose keys are router inputs captured
from it (tiled with noise up to the requested size) with random logits."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from ..build.taps import capture_router_inputs
from ..config import KNNConfig
from ..memory.fingerprint import fingerprint
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .random_models import random_model


def bench_config(hidden: int, layers: int, experts: int, top_k: int, vocab: int) -> dict:
    heads = max(hidden // 64, 1)
    return dict(
        model_type="qwen3_moe",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 2,
        moe_intermediate_size=hidden // 2,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        mlp_only_layers=[],
        vocab_size=vocab,
        max_position_embeddings=4096,
    )


def synthetic_memory(
    model, size: int, seed: int = 0, sequences: int = 4, noise: str = "isotropic"
) -> Memory:
    """``size`` entries per MoE layer around router inputs captured from ``model`` (on
    ``sequences`` random sequences of 256 tokens). ``noise``: ``isotropic`` (0.1 of the
    inputs' std in every direction), or ``data`` (random combinations of the captured inputs'
    deviations, with 0.1 of their covariance: the entries then spread along the directions
    real router inputs vary in, so nearest neighbours are not ties between copies)."""
    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    toks = mx.array(rng.integers(0, vocab, (sequences, 256)))
    with capture_router_inputs(model) as rec:
        mx.eval(getattr(model, "model", model)(toks))  # the router inputs; no vocabulary head
    keys, logits = {}, {}
    for layer, records in rec.items():
        base = np.array(mx.concatenate([r[0] for r in records]).astype(mx.float32))
        pick = rng.integers(0, len(base), size)
        if noise == "data":
            centred = base - base.mean(0)
            weights = rng.normal(0, np.sqrt(0.1 / len(base)), (size, len(base)))
            spread = (weights.astype(np.float32) @ centred).astype(np.float32)
        else:
            spread = rng.normal(0, 0.1 * base.std(), (size, base.shape[1])).astype(np.float32)
        keys[layer] = mx.array(base[pick] + spread)
        n = records[0][1].shape[-1]
        logits[layer] = mx.array(rng.normal(0, 1, (size, n)).astype(np.float32))
    return Memory(keys, logits, fingerprint(model))


def measure(model, prompt: mx.array, gen_tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` (prefill tokens/s, decode tokens/s) with mlx-lm's generate_step."""
    best_p, best_d = 0.0, 0.0
    for _ in range(repeats):
        tic = time.perf_counter()
        for n, _ in enumerate(generate_step(prompt, model, max_tokens=gen_tokens)):
            if n == 0:
                prefill = time.perf_counter() - tic
                tic = time.perf_counter()
        decode = time.perf_counter() - tic
        best_p = max(best_p, prompt.size / prefill)
        best_d = max(best_d, n / decode)
    return best_p, best_d


def run(
    hidden: int = 1024,
    layers: int = 8,
    experts: int = 32,
    top_k: int = 4,
    vocab: int = 8192,
    sizes: tuple[int, ...] = (10_000, 100_000),
    searches: tuple[str, ...] = ("exact", "hnsw"),
    mix: str = "topk",
    skip: tuple[str, float] | None = None,
    prompt_tokens: int = 256,
    gen_tokens: int = 64,
    repeats: int = 3,
    workdir: Path | None = None,
    log=print,
) -> list[dict]:
    config = bench_config(hidden, layers, experts, top_k, vocab)
    model = random_model(config, std=0.02)
    prompt = mx.array(np.random.default_rng(1).integers(0, vocab, prompt_tokens))
    measure(model, prompt, 8, 1)  # warm-up
    plain_p, plain_d = measure(model, prompt, gen_tokens, repeats)
    rows = [
        dict(
            memory=0,
            search="none",
            prefill_tps=plain_p,
            decode_tps=plain_d,
            prefill_ratio=1.0,
            decode_ratio=1.0,
            setup_s=0.0,
        )
    ]
    log(f"plain: prefill {plain_p:.1f} tok/s, decode {plain_d:.1f} tok/s")
    for size in sizes:
        memory = synthetic_memory(model, size)
        if workdir is not None:  # on disk, so the hnswlib index is cached beside it
            memory.save(Path(workdir) / f"bench-{size}.st", force=True)
        for search in searches:
            t0 = time.perf_counter()
            config = KNNConfig(mix=mix, search=search)
            if skip is not None:
                config = config.updated(skip=skip[0], skip_threshold=skip[1])
            attach(model, memory, config, validate=False)
            mx.eval(model(prompt[None, :4]))  # builds the index / tables
            setup = time.perf_counter() - t0
            p, d = measure(model, prompt, gen_tokens, repeats)
            # plain again, interleaved, so drift in machine speed shows up in the ratio
            detach(model)
            plain_p, plain_d = measure(model, prompt, gen_tokens, repeats)
            rows.append(
                dict(
                    memory=size,
                    search=search,
                    prefill_tps=p,
                    decode_tps=d,
                    prefill_ratio=p / plain_p,
                    decode_ratio=d / plain_d,
                    setup_s=setup,
                )
            )
            log(
                f"{size} entries/layer, {search}: prefill {p:.1f} tok/s ({p / plain_p:.3f}x), "
                f"decode {d:.1f} tok/s ({d / plain_d:.3f}x), setup {setup:.1f}s"
            )
        del memory
        gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| memory / layer | search | prefill tok/s | prefill ratio | decode tok/s | "
        "decode ratio | setup s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['memory']:,} | {r['search']} | {r['prefill_tps']:.1f} | "
            f"{r['prefill_ratio']:.3f} | {r['decode_tps']:.1f} | {r['decode_ratio']:.3f} | "
            f"{r['setup_s']:.1f} |"
        )
    return "\n".join(out)
