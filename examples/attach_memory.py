"""Attach a memory to a model in Python, generate with and without it, read the statistics.

Runs offline on a tiny random model: python examples/attach_memory.py
(With a real model: load("mlx-community/...", memory="med.st").)
"""

import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm import generate

from mlx_knnmoe import (
    KNNConfig,
    Memory,
    attach,
    capture_router_inputs,
    detach,
    fingerprint,
    knn_stats,
    load,
    set_stats,
)
from mlx_knnmoe.tiny import make_tiny_model_dir

with tempfile.TemporaryDirectory() as tmp:
    model_dir = make_tiny_model_dir(Path(tmp) / "tiny-qwen3-moe")
    model, tokenizer = load(str(model_dir))
    prompt = "Question: which expert handles this token? Answer:"

    # A stand-in memory: router inputs of the prompt, paired with logits that prefer expert 0.
    # (mlx_knnmoe.build_memory makes real ones by a gradient step on a reference set.)
    with capture_router_inputs(model) as records:
        mx.eval(model(mx.array([tokenizer.encode(prompt)])))
    keys = {layer: mx.concatenate([x for x, _ in recs]) for layer, recs in records.items()}
    logits = {
        layer: mx.concatenate([z for _, z in recs]).astype(mx.float32) + 4.0 * (mx.arange(8) == 0)
        for layer, recs in records.items()
    }
    memory = Memory(keys, logits, fingerprint(model))
    memory.save(Path(tmp) / "demo.st")

    print("plain  :", generate(model, tokenizer, prompt, max_tokens=12))
    attach(model, Path(tmp) / "demo.st", KNNConfig(k=1, mix="topk"))
    set_stats(model)
    print("kNN-MoE:", generate(model, tokenizer, prompt, max_tokens=12))
    for layer, s in knn_stats(model).items():
        print(
            f"layer {layer}: mean lambda {s['mean_lambda']:.3f}, experts changed on "
            f"{s['changed_share']:.0%} of {s['tokens']} tokens"
        )
    detach(model)
