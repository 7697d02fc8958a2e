"""Shared test helpers: memories from captured router inputs, dense assignments of a block."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_knnmoe import Memory, MemoryFormatError, capture_router_inputs, fingerprint
from mlx_knnmoe.arch.specs import get_path, set_path, spec_for
from mlx_knnmoe.memory.schema import HASH_FIELD, metadata_digest, tensor_digest
from mlx_knnmoe.retrieval.router import KNNExperts

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (not a package module) imported by its path."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokens(seed: int, shape=(2, 12), vocab: int = 300) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, shape))


def captured(model, toks):
    """Per MoE layer: (router inputs [T, d], router logits [T, N]) of one forward."""
    with capture_router_inputs(model) as rec:
        mx.eval(model(toks))
    return {
        layer: (mx.concatenate([r[0] for r in v]), mx.concatenate([r[1] for r in v]))
        for layer, v in rec.items()
    }


def memory_from(model, toks, logits_fn=None, **kwargs) -> Memory:
    """A memory keyed on captured router inputs; values logits_fn(captured logits)."""
    cap = captured(model, toks)
    fn = logits_fn or (lambda z: z)
    keys = {layer: x for layer, (x, _) in cap.items()}
    logits = {layer: fn(z.astype(mx.float32)) for layer, (_, z) in cap.items()}
    return Memory(keys, logits, fingerprint(model), **kwargs)


def force_expert(expert: int):
    def fn(z):
        return mx.where(mx.arange(z.shape[-1]) == expert, 10.0, -10.0) * mx.ones_like(z)

    return fn


class OneHotExperts(nn.Module):
    """Expert e outputs the unit vector e_e, so a block's output reveals its assignment."""

    def __init__(self, dim: int, zero: bool = False):
        super().__init__()
        self.dim, self.zero = dim, zero

    def __call__(self, x, indices):
        out = (indices[..., None] == mx.arange(self.dim)).astype(mx.float32)
        return mx.zeros_like(out) if self.zero else out


def dense_assignment(model, layer: int, x: mx.array) -> np.ndarray:
    """The expert weights [T, N] the MoE block of ``layer`` applies to router inputs x."""
    spec = spec_for(model)
    block = getattr(model.layers[layer], spec.block)
    slot = get_path(block, spec.experts)
    original = slot.inner if isinstance(slot, KNNExperts) else slot
    dim = x.shape[-1]

    def put(experts):
        if isinstance(slot, KNNExperts):
            slot.inner = experts
        else:
            set_path(block, spec.experts, experts)

    def run(experts):
        put(experts)
        return np.array(block(x[None]).astype(mx.float32))[0]

    try:
        with_experts = run(OneHotExperts(dim))
        without = run(OneHotExperts(dim, zero=True))
    finally:
        put(original)
    n = fingerprint(model)["num_experts"]
    return (with_experts - without)[:, :n]


def rewritten(
    src: Path, dst: Path, tensors: dict | None = None, meta: dict | None = None, rehash: bool = True
) -> Path:
    """A copy of the memory file ``src`` with tensors and metadata strings replaced (a value of
    None removes one); ``rehash``: store the hashes of the new content, as a careful forger
    would, so that only the schema can catch what is wrong."""
    arrays, metadata = mx.load(str(src), format="safetensors", return_metadata=True)
    for changes, target in ((tensors or {}, arrays), (meta or {}, metadata)):
        for name, value in changes.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    if rehash and HASH_FIELD in metadata:
        digests = {
            name: tensor_digest(Memory.dtype_name(x), tuple(x.shape), Memory.to_numpy(x))
            for name, x in arrays.items()
        }
        metadata[HASH_FIELD] = json.dumps(
            {"tensors": digests, "metadata": metadata_digest(metadata)}
        )
    mx.save_safetensors(str(dst) + ".safetensors", arrays, metadata=metadata)
    Path(str(dst) + ".safetensors").replace(dst)  # mlx adds the suffix to any other name
    return dst


def refused(src: Path, dst: Path, match: str, tensors: dict | None = None, **meta) -> None:
    """``src`` rewritten to ``dst`` (see ``rewritten``: ``tensors`` and metadata strings
    ``meta`` replaced) fails to load with a MemoryFormatError matching ``match``."""
    with pytest.raises(MemoryFormatError, match=match):
        Memory.load(rewritten(src, dst, tensors, meta or None))


def dead_pid() -> int:
    """The pid of a process that has exited (the writer of a stale temporary)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
