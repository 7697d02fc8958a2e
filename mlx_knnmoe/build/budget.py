"""A memory made to fit a size budget (``build_memory --budget 10%`` or ``--budget 400MB``).

The ladder, in the order of the price measured on the bundled benchmark (EXPERIMENTS.md, "The
price of compact memory formats"; each step keeps the earlier ones): keys as built (the
model's dtype) with float16 values (100% of float32's gain); values kept for the top 2k
experts only (memory/values.py; 100%); int8 keys (100%); int8 keys PCA-projected to d/2, d/4,
d/8, d/16, d/32 (98% to 95%); at the smallest projection, values for the top k experts only
(99% alone). If even the last step does not fit, entries are condensed: mutual nearest
neighbours whose optimised logits pick the same experts are merged into their mean, pass
after pass, until the memory fits.
"""

from __future__ import annotations

import re
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..arch.specs import moe_layers, routing_map, spec_for
from ..memory.compress import compress, encode_keys, router_score
from ..memory.ivf import train_ivf
from ..memory.store import Memory
from ..memory.values import top_values
from ..retrieval.search import IvfSearch

PCA_DIVISORS = (2, 4, 8, 16, 32)
# ``--budget auto`` (the default): this share of the weights for models of at least this many
# weight bytes (a 4-bit OLMoE-1B-7B is 3.9 GB: BENCHMARKS.md, issue 13); smaller models keep
# the memory as built, where it costs a few MB and every compression step its price
AUTO_SHARE, AUTO_MIN_MODEL_BYTES = 0.10, 1e9
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(text: str) -> tuple[str, float]:
    """``10%`` -> ("share", 0.10) of the model's weight bytes; ``400MB`` -> ("bytes", 4e8);
    ``auto`` -> ("auto", AUTO_SHARE); ``off`` -> ("off", 0)."""
    word = text.strip().lower()
    if word in ("auto", "off"):
        return word, AUTO_SHARE if word == "auto" else 0.0
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"budget must look like 10%, 400MB, auto or off, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit == "%":
        return "share", value / 100
    return "bytes", value * _UNITS[unit]


def model_weight_bytes(model: nn.Module) -> int:
    return sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))


def budget_bytes(budget: str, model: nn.Module) -> int | None:
    """The budget in bytes, or None for none (``off``, or ``auto`` on a small model)."""
    kind, value = parse_budget(budget)
    if kind == "off":
        return None
    weights = model_weight_bytes(model)
    if kind == "auto":
        return int(value * weights) if weights >= AUTO_MIN_MODEL_BYTES else None
    return int(value * weights) if kind == "share" else int(value)


def _ladder(memory: Memory) -> list[dict]:
    dim = min(int(memory.keys[layer].shape[1]) for layer in memory.layers)
    n, k = int(memory.fingerprint["num_experts"]), int(memory.fingerprint["top_k"])
    top = dict(top_experts=2 * k) if 2 * k < n else {}
    steps = [dict(values="float16"), dict(values="float16", **top)]
    steps += [dict(keys="int8", values="float16", **top)]
    steps += [
        dict(keys="int8", values="float16", pca=dim // d, **top)
        for d in PCA_DIVISORS
        if dim // d >= 8
    ]
    if k < n and k < top.get("top_experts", n):
        steps.append({**steps[-1], "top_experts": k})
    unique = []  # without top-m values (2k >= N) the second step repeats the first
    for step in steps:
        if step not in unique:
            unique.append(step)
    return unique


def fit_budget(memory: Memory, limit: int, model: nn.Module, log=print) -> Memory:
    """The first memory on the ladder whose bytes are within ``limit``; condensed if none."""
    for step in _ladder(memory):
        small = compress(memory, **step)
        log(f"budget {limit / 1e6:.1f} MB: {_describe(step)} takes {small.nbytes() / 1e6:.1f} MB")
        if small.nbytes() <= limit:
            return replace(small, compression={**small.compression, "budget": limit})
    while small.nbytes() > limit:
        before = small.num_entries()
        small = condense(small, model)
        log(
            f"condensed {sum(before.values())} -> {sum(small.num_entries().values())} entries: "
            f"{small.nbytes() / 1e6:.1f} MB"
        )
        if small.num_entries() == before:
            raise ValueError(
                f"the memory cannot be brought under {limit / 1e6:.1f} MB "
                f"(smallest: {small.nbytes() / 1e6:.1f} MB); raise --budget"
            )
    return replace(small, compression={**small.compression, "budget": limit})


def _describe(step: dict) -> str:
    keys = step.get("keys", "keys as built")
    top = f" of the top {step['top_experts']} experts" if "top_experts" in step else ""
    return f"{keys}" + (f", PCA {step['pca']}" if "pca" in step else "") + f", float16 values{top}"


def _same_experts(memory: Memory, model: nn.Module, layer: int) -> np.ndarray:
    """The sorted expert set [M, k] each entry's optimised logits select."""
    rmap = routing_map(spec_for(model), moe_layers(model)[layer])
    return np.sort(np.array(rmap.select(mx.array(memory.dense_logits(layer)))[0]), axis=-1)


def _mutual_pairs(memory: Memory, layer: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with b the nearest other entry of a and a that of b (IVF on the stored keys)."""
    dense = memory.dense_keys(layer)
    m = len(dense)
    search = IvfSearch(
        memory.keys[layer],
        "rbf",
        *train_ivf(mx.array(dense)),
        nprobe,
        memory.key_scales.get(layer),
    )
    nearest = np.concatenate(
        [np.array(search(mx.array(dense[s : s + 4096]), 2)[0]) for s in range(0, m, 4096)]
    )
    rows = np.arange(m)
    other = np.where(nearest[:, 0] == rows, nearest[:, 1], nearest[:, 0])
    mutual = (other[other] == rows) & (rows < other)
    return rows[mutual], other[mutual]


def condense(memory: Memory, model: nn.Module, nprobe: int = 4) -> Memory:
    """One pass: every pair of mutual nearest neighbours whose optimised logits select the same
    experts becomes one entry, the mean of both keys and of both logits (top-m values: of
    both rebuilt rows, kept again for the top m experts)."""
    keys, scales, logits = dict(memory.keys), dict(memory.key_scales), dict(memory.logits)
    top, rest = dict(memory.top_experts), dict(memory.rest_logits)
    merged = dict(memory.compression.get("condensed", {}))
    fmt = memory.compression.get("keys", str(memory.keys[memory.layers[0]].dtype).split(".")[-1])
    for layer in memory.layers:
        if memory.keys[layer].shape[0] < 2:
            continue
        a, b = _mutual_pairs(memory, layer, nprobe)
        experts = _same_experts(memory, model, layer)
        same = (experts[a] == experts[b]).all(-1)
        a, b = a[same], b[same]
        keep = np.ones(memory.keys[layer].shape[0], bool)
        keep[b] = False
        dense = memory.dense_keys(layer)
        dense[a] = (dense[a] + dense[b]) / 2
        values = memory.dense_logits(layer)
        values[a] = (values[a] + values[b]) / 2
        dtype = memory.logits[layer].dtype
        if layer in top:
            m, score = top[layer].shape[1], router_score(memory.fingerprint["model_type"])
            experts_kept, values, rest_kept = top_values(values[keep], m, score)
            top[layer], rest[layer] = mx.array(experts_kept), mx.array(rest_kept).astype(dtype)
        else:
            values = values[keep]
        logits[layer] = mx.array(values).astype(dtype)
        keys[layer], scale = encode_keys(dense[keep], fmt)
        scales.pop(layer, None)
        if scale is not None:
            scales[layer] = scale
        merged[str(layer)] = merged.get(str(layer), 0) + int(len(a))
    mx.eval(keys, scales, logits, top, rest)
    return replace(
        memory,
        keys=keys,
        key_scales=scales,
        logits=logits,
        top_experts=top,
        rest_logits=rest,
        ivf={},
        path=None,
        compression={**memory.compression, "condensed": merged},
    )
