"""The realistic-shape benchmark: a real MoE model's shape (speed/shapes.py) with fewer
layers, memories sized like a real build, per key format and search path: bytes per layer
and for the whole model as a share of the 4-bit model, decode and prefill ratios to the
plain model in the same run, recall@1 against exact search on the same keys (for held-out
entries of the memory's own distribution, and for router inputs of a random sequence), setup
time."""

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

HELD_OUT = 256  # entries per layer generated like the memory's and kept out of it: queries


def parse_format(fmt: str) -> dict:
    """``compress`` arguments of a format name: a key format (``float16``, ``int8``, ...),
    optionally ``-pcaN`` (PCA to d/N dimensions) and ``-topM`` (values of the top M experts
    only); values are float16."""
    keys, *rest = fmt.split("-")
    out: dict = dict(keys=keys, values="float16")
    for part in rest:
        name = "pca" if part.startswith("pca") else "top" if part.startswith("top") else None
        number = part[len(name or "") :]
        if name is None or not number.isdigit() or int(number) < 1:
            raise ValueError(f"format {fmt!r}: expected KEYS[-pcaN][-topM], found {part!r}")
        out[name] = int(number)
    return out


def format_memory(base: Memory, fmt: str) -> Memory:
    """``base`` in the format ``fmt`` (``parse_format``)."""
    options = parse_format(fmt)
    if "pca" in options:
        options["pca"] = int(base.keys[base.layers[0]].shape[1]) // options["pca"]
    if "top" in options:
        options["top_experts"] = options.pop("top")
    return compress(base, **options)


def held_out(memory: Memory, n: int) -> tuple[Memory, dict[int, mx.array]]:
    """The memory without its last ``n`` entries per layer, and those entries' keys: queries
    from the memory's own distribution that it does not hold."""
    keys = {layer: k[:-n] for layer, k in memory.keys.items()}
    logits = {layer: v[:-n] for layer, v in memory.logits.items()}
    queries = {layer: k[-n:] for layer, k in memory.keys.items()}
    return Memory(keys, logits, memory.fingerprint), queries


def _recalls(model, memory: Memory, config: KNNConfig, in_domain: dict, queries: dict) -> dict:
    """recall@1 for held-out entries and for router inputs of a random sequence."""
    return dict(
        recall_at_1=_recall(model, memory, config, in_domain),
        recall_at_1_random=_recall(model, memory, config, queries),
    )


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
    held = min(HELD_OUT, entries)
    base, in_domain = held_out(
        synthetic_memory(model, entries + held, sequences=2, noise="data"), held
    )
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
            recalls = partial(_recalls, model, memory, config, in_domain, queries)
            timed = timed_against_plain(model, memory, config, prompt, gen_tokens, repeats, recalls)
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
                **timed.probe,
                setup_s=timed.setup_s,
                compress_s=compress_s,
                plain_decode_tps=timed.plain_decode_tps,
            )
            rows.append(row)
            log(
                f"{fmt}, {row['search']}: {per_layer / 1e6:.1f} MB/layer, {share:.1%} of the "
                f"model; prefill {row['prefill_ratio']:.3f}x, decode {row['decode_ratio']:.3f}x, "
                f"recall@1 {row['recall_at_1']:.3f} (random sequence "
                f"{row['recall_at_1_random']:.3f}), setup {timed.setup_s:.1f}s"
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
        "prefill ratio | decode ratio | recall@1 held out | recall@1 random sequence | setup s",
        "{shape} | {format} | {search} | {mb:.1f} | {gb:.2f} | {share_of_model:.1%} | "
        "{prefill_ratio:.3f} | {decode_ratio:.3f} | {recall_at_1:.3f} | "
        "{recall_at_1_random:.3f} | {setup_s:.1f}",
    )
