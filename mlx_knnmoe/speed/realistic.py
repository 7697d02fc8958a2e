"""The realistic-shape benchmark: a real MoE model's shape (speed/shapes.py) with fewer
layers, memories sized like a real build, per key format and search path: bytes per layer
and for the whole model as a share of the 4-bit model, decode and prefill ratios to the
plain model in the same run, recall@1 against exact search on the same keys, setup time."""

from __future__ import annotations

import gc
import time
from functools import partial

import mlx.core as mx
import numpy as np

from ..build.taps import capture_router_inputs
from ..config import KNNConfig
from ..memory.compress import compress
from ..memory.store import Memory
from ..retrieval.attach import routers
from ..retrieval.search import ExactSearch
from .bench import markdown_table, measure, timed_against_plain
from .inference import synthetic_memory
from .shapes import SHAPES, full_model_bytes, quantised_random_model, reduced_config


def format_memory(base: Memory, fmt: str) -> Memory:
    """``base`` in a key format: ``float16``, ``int8``, ... optionally ``-pcaN`` (PCA to d/N
    dimensions); values always float16."""
    keys, _, pca = fmt.partition("-pca")
    dim = int(base.keys[base.layers[0]].shape[1]) // int(pca) if pca else None
    return compress(base, keys=keys, pca=dim, values="float16")


def _queries(model, seed: int = 7) -> dict[int, mx.array]:
    """Router inputs of a random sequence the memory has not seen, per MoE layer."""
    toks = mx.array(np.random.default_rng(seed).integers(0, model.args.vocab_size, (1, 128)))
    with capture_router_inputs(model) as rec:
        mx.eval(getattr(model, "model", model)(toks))
    return {layer: mx.concatenate([r[0] for r in records]) for layer, records in rec.items()}


def _recall(model, memory: Memory, config: KNNConfig, queries: dict) -> float:
    """Share of queries whose nearest neighbour is exact search's on the same compact keys."""
    hits = []
    for layer, router in routers(model).items():
        lm, q = router.memory, queries[layer].astype(mx.float32)
        if layer in memory.projection:
            q = q @ memory.projection[layer].astype(mx.float32).T
        got = lm.searcher(config)(q, 1)[0]
        want = ExactSearch(lm.keys, config.similarity, lm.key_scales)(q, 1)[0]
        hits.append(np.array(got).ravel() == np.array(want).ravel())
    return float(np.concatenate(hits).mean())


def run_shape(
    shape: str,
    layers: int = 2,
    examples: int = 1000,
    tokens_per_example: int = 150,
    formats: tuple[str, ...] = ("int8-pca8",),
    searches: tuple[str, ...] = ("ivf", "exact"),
    nprobe: int = 8,
    prompt_tokens: int = 64,
    gen_tokens: int = 16,
    repeats: int = 2,
    log=print,
) -> list[dict]:
    tic = time.perf_counter()
    model = quantised_random_model(reduced_config(shape, layers))
    full_bytes = full_model_bytes(model, shape)
    full_layers = SHAPES[shape]["num_hidden_layers"]
    log(
        f"{shape}: {layers} of {full_layers} layers, 4-bit, built in "
        f"{time.perf_counter() - tic:.0f}s; whole 4-bit model {full_bytes / 1e9:.2f} GB"
    )
    vocab = model.args.vocab_size
    prompt = mx.array(np.random.default_rng(1).integers(0, vocab, prompt_tokens))
    measure(model, prompt, 4, 1)  # warm-up
    plain_p, plain_d = measure(model, prompt, gen_tokens, repeats)
    log(f"plain: prefill {plain_p:.1f} tok/s, decode {plain_d:.2f} tok/s")
    entries = examples * tokens_per_example
    tic = time.perf_counter()
    base = synthetic_memory(model, entries, sequences=2, noise="data")
    queries = _queries(model)
    log(f"{entries:,} entries per layer captured in {time.perf_counter() - tic:.0f}s")
    rows = []
    for fmt in formats:
        tic = time.perf_counter()
        memory = format_memory(base, fmt)
        compress_s = time.perf_counter() - tic
        per_layer = memory.nbytes() / len(memory.layers)
        share = per_layer * full_layers / full_bytes
        for search in searches:
            config = KNNConfig(search=search, nprobe=nprobe)
            recall_at_1 = partial(_recall, model, memory, config, queries)
            timed = timed_against_plain(
                model, memory, config, prompt, gen_tokens, repeats, recall_at_1
            )
            recall = timed.probe
            row = dict(
                shape=shape,
                format=fmt,
                search=search if search != "ivf" else f"ivf nprobe {nprobe}",
                entries=entries,
                bytes_per_layer=int(per_layer),
                full_model_memory_bytes=int(per_layer * full_layers),
                share_of_model=share,
                prefill_ratio=timed.prefill_ratio,
                decode_ratio=timed.decode_ratio,
                recall_at_1=recall,
                setup_s=timed.setup_s,
                compress_s=compress_s,
                plain_decode_tps=timed.plain_decode_tps,
            )
            rows.append(row)
            log(
                f"{fmt}, {row['search']}: {per_layer / 1e6:.1f} MB/layer, {share:.1%} of the "
                f"model; prefill {row['prefill_ratio']:.3f}x, decode {row['decode_ratio']:.3f}x, "
                f"recall@1 {recall:.3f}, setup {timed.setup_s:.1f}s"
            )
        del memory
        gc.collect()
    return rows


def shape_table(rows: list[dict]) -> str:
    return markdown_table(
        [
            dict(r, mb=r["bytes_per_layer"] / 1e6, gb=r["full_model_memory_bytes"] / 1e9)
            for r in rows
        ],
        "shape | keys | search | MB / layer | whole model GB | share of 4-bit model | "
        "prefill ratio | decode ratio | recall@1 | setup s",
        "{shape} | {format} | {search} | {mb:.1f} | {gb:.2f} | {share_of_model:.1%} | "
        "{prefill_ratio:.3f} | {decode_ratio:.3f} | {recall_at_1:.3f} | {setup_s:.1f}",
    )
