"""Attach a memory to a model in Python, generate with and without it, read the statistics.

Runs offline on the bundled model: python examples/attach_memory.py
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
from mlx_knnmoe.bundled import MODEL_DIR

with tempfile.TemporaryDirectory() as tmp:
    model, tokenizer = load(str(MODEL_DIR))
    prompt = "vosk: r j r r ->"

    # A stand-in memory: router inputs of the prompt, paired with logits that prefer expert 0.
    # (mlx_knnmoe.build_memory makes real ones by a gradient step on a reference set.)
    with capture_router_inputs(model) as records:
        mx.eval(model(mx.array([tokenizer.encode(prompt)])))
    keys = {layer: mx.concatenate([x for x, _ in recs]) for layer, recs in records.items()}
    logits = {
        layer: mx.concatenate([z for _, z in recs]).astype(mx.float32)
        + 4.0 * (mx.arange(recs[0][1].shape[-1]) == 0)
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
