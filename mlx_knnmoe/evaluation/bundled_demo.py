"""kNN-MoE on the bundled model, end to end (the ``mlx_knnmoe.demo`` command prints it).

The bundled model (``mlx_knnmoe/bundled/model``, trained by ``examples/bundled/train.py``)
learned eight letter-cipher tasks, each announced by a cue word. In the shifted domain the same
tasks come with other cue words that the model saw rarely in training, so its routers send
those tokens to the wrong experts. The demo builds a memory from the shifted reference split,
then scores the plain model and kNN-MoE on the shifted test split and on the original domain
(where the memory should find nothing similar and fall back to the router), and generates one
answer with and without the memory.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlx_lm import load

from ..build.pipeline import build_memory
from ..bundled import DATA_DIR as BUNDLED_DATA
from ..bundled import MODEL_DIR as BUNDLED_MODEL
from ..config import KNNConfig
from ..data.examples import load_dataset
from ..data.formats import multiple_choice
from ..data.records import read_records
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .compare import compare, score_variants

SPLITS = ("shift_test_text", "orig_test_text", "shift_test_mc", "orig_test_mc")


def load_split(path: Path, tokenizer, limit: int | None) -> tuple[list | None, list | None]:
    """(multiple-choice items, None) or (None, text examples) for one evaluation split."""
    if path.name.endswith("_mc.jsonl"):
        return [multiple_choice(r, "mmlu") for _, r in list(read_records(path))[:limit]], None
    return None, load_dataset(path, tokenizer, "completion", limit, shuffle=False).examples


def build_demo_memory(
    model, tokenizer, data_dir: Path, ref_examples: int | None, eta, surrogate, config, log, **kw
) -> Memory:
    """The memory from the shifted reference split in prompt/completion form (``kw``: further
    ``build_memory`` arguments). (One from the multiple-choice reference split has 3.7x the
    entries, did not help multiple choice and hurt text; see EXPERIMENTS.md.)"""
    path = data_dir / "shift_ref_text.jsonl"
    tic = time.perf_counter()
    memory = build_memory(
        model,
        tokenizer,
        path,
        eta=eta,
        surrogate=surrogate,
        max_examples=ref_examples,
        retrieval=config,
        progress=False,
        **kw,
    )
    entries = memory.num_entries()[memory.layers[0]]
    tuned = memory.build.get("eta_auto")
    how = ""
    if tuned:
        scores = ", ".join(
            f"{e:g}: {n:.3f}" for e, n in zip(tuned["grid"], tuned["heldout_nll"]) if n is not None
        )
        how = f" (held-out NLL: plain {tuned['plain_nll']:.3f}; {scores})"
    log(
        f"memory from {path.name}: {entries} entries per layer, dense surrogate k'="
        f"{memory.build['dense_surrogate']}, eta {memory.build['eta']:g}"
        f"{how}, built in {time.perf_counter() - tic:.1f}s"
    )
    return memory


def score_splits(model, tokenizer, data_dir, memory, config, test_examples, seed) -> dict:
    """Plain vs kNN-MoE on each evaluation split: metric, paired bootstrap difference."""
    out = {}
    for split in SPLITS:
        items, examples = load_split(data_dir / f"{split}.jsonl", tokenizer, test_examples)
        variants = [("plain", None, None), ("knn-moe", memory, config)]
        results = score_variants(model, tokenizer, items, examples, variants, 4096)
        out[split] = compare(results, items is not None, 1000, seed, 2)
    return out


def generate_pair(model, tokenizer, memory, config, data_dir: Path, tries: int = 50) -> dict:
    """Greedy answers, without and with the memory, to the first shifted test prompt (of the
    first ``tries``) that the plain model gets wrong; the first prompt if it gets all right."""
    from mlx_lm import generate

    records = [r for _, r in read_records(data_dir / "shift_test_text.jsonl")][:tries]
    for record in records:
        n = len(tokenizer.encode(record["completion"]))
        plain = generate(model, tokenizer, record["prompt"], max_tokens=n)
        if plain.strip() != record["completion"].strip():
            break
    else:
        record = records[0]
        n = len(tokenizer.encode(record["completion"]))
        plain = generate(model, tokenizer, record["prompt"], max_tokens=n)
    attach(model, memory, config)
    try:
        knn = generate(model, tokenizer, record["prompt"], max_tokens=n)
    finally:
        detach(model)
    return {"prompt": record["prompt"], "gold": record["completion"], "plain": plain, "knn": knn}


def run_demo(
    model_path: str | Path = BUNDLED_MODEL,
    data_dir: str | Path = BUNDLED_DATA,
    *,
    ref_examples: int | None = None,
    test_examples: int | None = None,
    eta: float | str = "auto",
    surrogate: int | str | None = "auto",
    config: KNNConfig | None = None,
    seed: int = 0,
    save_memory: str | Path | None = None,
    log=print,
) -> dict:
    """Build the memory, score plain vs kNN-MoE on every split, generate one answer."""

    started = time.perf_counter()
    data_dir = Path(data_dir)
    config = config or KNNConfig()
    model, tokenizer = load(str(model_path))
    memory = build_demo_memory(
        model, tokenizer, data_dir, ref_examples, eta, surrogate, config, log
    )
    if save_memory is not None:
        memory.save(save_memory)
        log(f"memory saved to {save_memory}")
    scores = score_splits(model, tokenizer, data_dir, memory, config, test_examples, seed)
    sample = generate_pair(model, tokenizer, memory, config, data_dir)
    return {"scores": scores, "sample": sample, "seconds": time.perf_counter() - started}


def result_table(scores: dict) -> str:
    """One row per split: plain, kNN-MoE, difference with its 95% interval, mean lambda."""
    head = f"{'split':<18}{'metric':<8}{'plain':>8}{'kNN-MoE':>9}{'diff [95% CI]':>28}{'lambda':>8}"
    lines = [head, "-" * len(head)]
    for split, summary in scores.items():
        plain, knn = summary["variants"]
        metric = "acc" if "acc" in plain else "ppl"
        d = knn["vs_plain"][metric]
        interval = f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
        lam = knn["routing"]["mean_lambda"]
        lines.append(
            f"{split:<18}{metric:<8}{plain[metric]:>8.4f}{knn[metric]:>9.4f}{interval:>28}"
            f"{lam:>8.3f}"
        )
    return "\n".join(lines)


def verdict(scores: dict) -> str:
    """Plain words on whether the interval excludes zero, in the helpful direction."""
    lines = []
    for split, summary in scores.items():
        knn = summary["variants"][1]
        metric = "acc" if "acc" in knn else "ppl"
        lo, hi = knn["vs_plain"][metric]["ci95"]
        better = lo > 0 if metric == "acc" else hi < 0
        worse = hi < 0 if metric == "acc" else lo > 0
        word = "better" if better else "worse" if worse else "no significant change"
        lines.append(f"  {split}: {word}")
    return "\n".join(lines)
