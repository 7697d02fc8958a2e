"""mlx_knnmoe.benchmark: decode and prefill speed with a memory, as ratios to the plain model.

A random qwen3_moe-shaped model; memories whose keys are router inputs captured from it
(tiled with noise up to the requested size) and random logits. Every configuration runs in
the same process as the plain model it is compared with.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from .config import KNNConfig
from .memory import Memory, fingerprint
from .options import parse_skip
from .router import attach, capture_router_inputs, detach
from .tiny import build_model, tiny_config


def bench_config(hidden: int, layers: int, experts: int, top_k: int, vocab: int) -> dict:
    heads = max(hidden // 64, 1)
    return tiny_config(
        "qwen3_moe",
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


def synthetic_memory(model, size: int, seed: int = 0) -> Memory:
    """``size`` entries per MoE layer around router inputs captured from ``model``."""
    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    toks = mx.array(rng.integers(0, vocab, (4, 256)))
    with capture_router_inputs(model) as rec:
        mx.eval(model(toks))
    keys, logits = {}, {}
    for layer, records in rec.items():
        base = np.array(mx.concatenate([r[0] for r in records]).astype(mx.float32))
        pick = rng.integers(0, len(base), size)
        noise = rng.normal(0, 0.1 * base.std(), (size, base.shape[1])).astype(np.float32)
        keys[layer] = mx.array(base[pick] + noise)
        n = records[0][1].shape[-1]
        logits[layer] = mx.array(rng.normal(0, 1, (size, n)).astype(np.float32))
    return Memory(keys, logits, fingerprint(model))


def measure(model, prompt: mx.array, gen_tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` (prefill tokens/s, decode tokens/s) with mlx-lm's generate_step."""
    from mlx_lm.generate import generate_step

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
    model = build_model(config, std=0.02)
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


def run_build(
    hidden: int = 1024,
    layers: int = 8,
    experts: int = 32,
    top_k: int = 4,
    vocab: int = 8192,
    batch: int = 8,
    seq_len: int = 256,
    batches: int = 4,
    log=print,
) -> list[dict]:
    """Build throughput (tokens/s) as ratios to mlx-lm's teacher-forced forward, same run."""
    from .build import optimise_batch
    from .builder import build_memory
    from .data import Dataset, Example

    config = bench_config(hidden, layers, experts, top_k, vocab)
    model = build_model(config, std=0.02)
    rng = np.random.default_rng(2)
    data = [mx.array(rng.integers(0, vocab, (batch, seq_len))) for _ in range(batches)]
    mask = mx.ones((batch, seq_len))
    n_tokens = batch * seq_len * batches

    def forward():
        for toks in data:
            mx.eval(model(toks))

    def step(**kw):
        def fn():
            for toks in data:
                r = optimise_batch(model, toks, mask, mask, [1.0], **kw)
                mx.eval(r.keys, r.logits)

        return fn

    def pipeline(**kw):
        return lambda: _pipeline(**kw)

    def _pipeline(**kw):
        examples = [
            Example(row, [0] + [1] * (seq_len - 1), f"bench:{i}")
            for i, row in enumerate(mx.concatenate(data).tolist())
        ]
        build_memory(
            model,
            None,
            Dataset("bench", "bench", "0" * 64, "text", examples),
            batch_tokens=batch * seq_len,
            progress=False,
            **kw,
        )

    cases = [
        ("build step, S=1, sequence scope", step()),
        ("build step, S=3", step(steps=3)),
        ("build step, token scope", step(scope="token")),
        ("build step, dense surrogate k'=2k", step(surrogate=2 * top_k)),
        ("build step, dense surrogate k'=4k", step(surrogate=4 * top_k)),
        ("build_memory defaults (S=1, surrogate auto, eta auto)", pipeline()),
        ("build_memory, surrogate off (S=1, eta auto)", pipeline(surrogate="off")),
    ]
    forward()  # warm-up
    rows = []
    for name, fn in cases:
        t0 = time.perf_counter()
        forward()
        t_forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        row = dict(
            case=name,
            build_tps=n_tokens / t,
            forward_tps=n_tokens / t_forward,
            ratio=t_forward / t,
        )
        log(
            f"{name}: {row['build_tps']:.0f} tok/s, forward {row['forward_tps']:.0f} tok/s, "
            f"ratio {row['ratio']:.3f}"
        )
        rows.append(row)
    return rows


def run_ranks(
    ranks: tuple[int, ...],
    workdir: Path,
    examples: int = 256,
    seq_len: int = 128,
    log=print,
    **shape,
) -> list[dict]:
    """Wall time of ``mlx_knnmoe.build_memory --ranks N`` (fixed eta) for each N, one machine."""
    import subprocess
    import sys

    from .tiny import save_model_dir

    workdir = Path(workdir)
    config = bench_config(**shape)
    model_dir = save_model_dir(build_model(config, std=0.02), config, workdir / "model")
    rng = np.random.default_rng(3)
    data = workdir / "ranks.jsonl"
    words = ["fever", "cough", "renal", "cardiac", "dose", "acute", "chronic", "lesion"]
    lines = [" ".join(rng.choice(words, seq_len // 2)) for _ in range(examples)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rows = []
    for n in ranks:
        out = workdir / f"ranks{n}.st"
        cmd = [sys.executable, "-m", "mlx_knnmoe", "build_memory", "--model", str(model_dir)]
        cmd += ["--data", str(data), "--out", str(out), "--force", "--restart", "--quiet"]
        cmd += ["--eta", "1", "--max-seq-len", str(seq_len), "--ranks", str(n)]
        tic = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - tic
        tokens = Memory.load(out).build["tokens"]
        rows.append(dict(ranks=n, seconds=seconds, tokens=tokens, tps=tokens / seconds))
        log(f"{n} rank(s): {seconds:.1f} s, {tokens / seconds:.0f} tok/s")
    for r in rows:
        r["ratio"] = r["tps"] / rows[0]["tps"]
    return rows


def build_table(rows: list[dict]) -> str:
    out = ["| case | build tok/s | forward tok/s | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['build_tps']:.0f} | {r['forward_tps']:.0f} | {r['ratio']:.3f} |"
        )
    return "\n".join(out)


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


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hidden", type=int, default=1024, show_default=True)
@click.option("--layers", type=int, default=8, show_default=True)
@click.option("--experts", type=int, default=32, show_default=True)
@click.option("--top-k", type=int, default=4, show_default=True)
@click.option("--vocab", type=int, default=8192, show_default=True)
@click.option("--sizes", default="10000,100000", show_default=True, help="Entries per layer.")
@click.option("--searches", default="exact,hnsw", show_default=True)
@click.option("--mix", default="topk", show_default=True)
@click.option(
    "--skip-confident",
    "skip",
    default=None,
    callback=parse_skip,
    metavar="SIGNAL:T",
    help="Selective retrieval (entropy:T or margin:T), to measure its speed effect.",
)
@click.option("--prompt-tokens", type=int, default=256, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--quick", is_flag=True, help="A small model and memories: a one-minute check.")
@click.option(
    "--build-ranks",
    default=None,
    metavar="N,M",
    help="Time a whole build_memory run with each number of data-parallel ranks.",
)
@click.option(
    "--build",
    is_flag=True,
    help="Measure memory-build throughput against the forward pass instead of inference.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep memories and hnswlib indexes here between runs.",
)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write rows as JSON.")
def cli(
    quick: bool, build: bool, build_ranks, sizes: str, searches: str, workdir, output, **kw
) -> None:
    """Decode and prefill tokens/s with memories, as ratios to the plain model in the same run."""
    if build_ranks:
        shape = {k: kw[k] for k in ("hidden", "layers", "experts", "top_k", "vocab")}
        if quick:
            shape.update(hidden=256, layers=4, experts=16, top_k=2, vocab=2048)
        wd = Path(workdir or "benchmark-ranks")
        wd.mkdir(parents=True, exist_ok=True)
        rows = run_ranks(_ints(build_ranks), wd, log=lambda m: click.echo(m, err=True), **shape)
        click.echo("| ranks | seconds | tokens | tok/s | vs 1 rank |\n|---:|---:|---:|---:|---:|")
        for r in rows:
            click.echo(
                f"| {r['ranks']} | {r['seconds']:.1f} | {r['tokens']} | {r['tps']:.0f} | "
                f"{r['ratio']:.2f} |"
            )
        return
    if build:
        shape = {k: kw[k] for k in ("hidden", "layers", "experts", "top_k", "vocab")}
        if quick:
            shape.update(hidden=256, layers=4, experts=16, top_k=2, vocab=2048)
        rows = run_build(**shape, log=lambda m: click.echo(m, err=True))
        click.echo(build_table(rows))
        if output:
            Path(output).write_text(json.dumps({"settings": shape, "rows": rows}, indent=2))
        return
    if quick:
        kw.update(
            hidden=256,
            layers=4,
            experts=16,
            top_k=2,
            vocab=2048,
            prompt_tokens=128,
            gen_tokens=32,
            repeats=2,
        )
        sizes = "2000,20000"
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    rows = run(
        sizes=_ints(sizes),
        searches=tuple(searches.split(",")),
        workdir=workdir,
        log=lambda m: click.echo(m, err=True),
        **kw,
    )
    click.echo(table(rows))
    if output:
        Path(output).write_text(json.dumps({"settings": kw, "rows": rows}, indent=2))


main = cli

if __name__ == "__main__":
    main()
