"""Decode and prefill speed with a memory attached, as ratios to the plain model in the same
process: a random qwen3_moe-shaped model, and memories whose keys are router inputs captured
from it (tiled with noise up to the requested size) with random logits."""

from __future__ import annotations

import gc
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..build.taps import capture_router_inputs
from ..config import KNNConfig
from ..memory.fingerprint import fingerprint
from ..memory.store import Memory
from .bench import DEFAULT, BenchModel, Log, Timed, markdown_table, measure, timed_against_plain
from .random_models import random_model


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


def run(
    model_size: BenchModel = DEFAULT,
    sizes: tuple[int, ...] = (10_000, 100_000),
    searches: tuple[str, ...] = ("exact", "hnsw"),
    mix: str = "topk",
    skip: tuple[str, float] | None = None,
    prompt_tokens: int = 256,
    gen_tokens: int = 64,
    repeats: int = 3,
    workdir: Path | None = None,
    log: Log = print,
) -> list[dict]:
    """Per memory size and search: prefill and decode tokens/s with the memory and their
    ratios to the plain model measured right after it, and the setup time."""
    model = random_model(model_size.config(), std=0.02)
    prompt = mx.array(np.random.default_rng(1).integers(0, model_size.vocab, prompt_tokens))
    measure(model, prompt, 8, 1)  # warm-up
    plain_p, plain_d = measure(model, prompt, gen_tokens, repeats)
    rows = [_row(0, "none", Timed(0.0, plain_p, plain_d, plain_p, plain_d))]
    log(f"plain: prefill {plain_p:.1f} tok/s, decode {plain_d:.1f} tok/s")
    for size in sizes:
        memory = synthetic_memory(model, size)
        if workdir is not None:  # on disk, so the hnswlib index is cached beside it
            memory.save(Path(workdir) / f"bench-{size}.st", force=True)
        for search in searches:
            config = KNNConfig(mix=mix, search=search)
            if skip is not None:
                config = config.updated(skip=skip[0], skip_threshold=skip[1])
            t = timed_against_plain(model, memory, config, prompt, gen_tokens, repeats)
            rows.append(_row(size, search, t))
            log(
                f"{size} entries/layer, {search}: prefill {t.prefill_tps:.1f} tok/s "
                f"({t.prefill_ratio:.3f}x), decode {t.decode_tps:.1f} tok/s "
                f"({t.decode_ratio:.3f}x), setup {t.setup_s:.1f}s"
            )
        del memory
        gc.collect()
    return rows


def _row(size: int, search: str, t: Timed) -> dict:
    return dict(
        memory=size,
        search=search,
        prefill_tps=t.prefill_tps,
        decode_tps=t.decode_tps,
        prefill_ratio=t.prefill_ratio,
        decode_ratio=t.decode_ratio,
        setup_s=t.setup_s,
    )


def table(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        "memory / layer | search | prefill tok/s | prefill ratio | decode tok/s | decode ratio "
        "| setup s",
        "{memory:,} | {search} | {prefill_tps:.1f} | {prefill_ratio:.3f} | {decode_tps:.1f} | "
        "{decode_ratio:.3f} | {setup_s:.1f}",
    )
