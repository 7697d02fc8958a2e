"""Memory-build throughput as ratios to mlx-lm's teacher-forced forward in the same run, and
wall time of data-parallel builds with 1..N ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..build.gradient import optimise_batch
from ..build.pipeline import build_memory
from ..data.examples import Dataset, Example
from ..memory.store import Memory
from .bench import DEFAULT, BenchModel, Log, markdown_table
from .random_models import random_model, save_model_dir


def run_build(
    model_size: BenchModel = DEFAULT,
    batch: int = 8,
    seq_len: int = 256,
    batches: int = 4,
    log: Log = print,
) -> list[dict]:
    """Build throughput (tokens/s) as ratios to mlx-lm's teacher-forced forward, same run."""
    model = random_model(model_size.config(), std=0.02)
    rng = np.random.default_rng(2)
    data = [mx.array(rng.integers(0, model_size.vocab, (batch, seq_len))) for _ in range(batches)]
    top_k = model_size.top_k
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
    model_size: BenchModel = DEFAULT,
    examples: int = 256,
    seq_len: int = 128,
    log: Log = print,
) -> list[dict]:
    """Wall time of ``mlx_knnmoe.build_memory --ranks N`` (fixed eta) for each N, one machine."""
    workdir = Path(workdir)
    config = model_size.config()
    model_dir = save_model_dir(random_model(config, std=0.02), config, workdir / "model")
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
    return markdown_table(
        rows,
        "case | build tok/s | forward tok/s | ratio",
        "{case} | {build_tps:.0f} | {forward_tps:.0f} | {ratio:.3f}",
    )


def ranks_table(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        "ranks | seconds | tokens | tok/s | vs 1 rank",
        "{ranks:d} | {seconds:.1f} | {tokens:d} | {tps:.0f} | {ratio:.2f}",
    )
