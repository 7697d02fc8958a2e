"""What the speed benchmarks share: the sizes of the random qwen3_moe-shaped benchmark model
(``BenchModel``), decode and prefill timing (``measure``), a memory timed against the plain
model in the same run (``timed_against_plain``), and the Markdown tables they print."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step

from ..config import KNNConfig
from ..retrieval.attach import attach, detach

Log = Callable[[str], None]  # where a benchmark writes its progress lines


@dataclass(frozen=True)
class BenchModel:
    """The random benchmark model's sizes (``DEFAULT``; ``QUICK``: the one-minute check's)."""

    hidden: int = 1024
    layers: int = 8
    experts: int = 32
    top_k: int = 4
    vocab: int = 8192

    def config(self) -> dict:
        """Its mlx-lm qwen3_moe config."""
        heads = max(self.hidden // 64, 1)
        return dict(
            model_type="qwen3_moe",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            intermediate_size=self.hidden * 2,
            moe_intermediate_size=self.hidden // 2,
            num_attention_heads=heads,
            num_key_value_heads=max(heads // 4, 1),
            head_dim=64,
            num_experts=self.experts,
            num_experts_per_tok=self.top_k,
            mlp_only_layers=[],
            vocab_size=self.vocab,
            max_position_embeddings=4096,
        )


DEFAULT = BenchModel()
QUICK = BenchModel(hidden=256, layers=4, experts=16, top_k=2, vocab=2048)


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


@dataclass
class Timed:
    """A memory's speed and the plain model's, measured right after it."""

    setup_s: float  # attach and the first forward (builds indexes and tables)
    prefill_tps: float
    decode_tps: float
    plain_prefill_tps: float
    plain_decode_tps: float
    probe: Any = None  # what ``probe`` returned with the memory attached

    @property
    def prefill_ratio(self) -> float:
        return self.prefill_tps / self.plain_prefill_tps

    @property
    def decode_ratio(self) -> float:
        return self.decode_tps / self.plain_decode_tps


def timed_against_plain(
    model,
    memory: Any,
    config: KNNConfig,
    prompt: mx.array,
    gen_tokens: int,
    repeats: int,
    probe: Callable[[], Any] | None = None,
) -> Timed:
    """``memory`` attached with ``config`` and timed, then detached and the plain model timed
    again (interleaved, so drift in machine speed shows in both sides of the ratio).
    ``probe``: called once with the memory attached, before the timing."""
    tic = time.perf_counter()
    attach(model, memory, config, validate=False)
    mx.eval(model(prompt[None, :4]))  # builds the search index and tables of every layer
    setup = time.perf_counter() - tic
    probed = probe() if probe is not None else None
    p, d = measure(model, prompt, gen_tokens, repeats)
    detach(model)
    return Timed(setup, p, d, *measure(model, prompt, gen_tokens, repeats), probed)


def markdown_table(rows: Sequence[dict], header: str, cells: str) -> str:
    """``rows`` as a Markdown table: ``header`` names the columns (``"a | b"``), ``cells`` is
    the ``str.format`` template of a row's cells (``"{a} | {b:.2f}"``); a cell with a format
    spec is numeric, right-aligned."""
    align = ["---:" if ":" in cell else "---" for cell in cells.split(" | ")]
    lines = [f"| {header} |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + [f"| {cells.format(**r)} |" for r in rows])
