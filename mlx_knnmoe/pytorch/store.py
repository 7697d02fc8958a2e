"""The memory in torch tensors: the file format of ``memory/file_format.py`` read and written
with the ``safetensors`` package, so a memory built on either side loads on the other; and the
fingerprint of a transformers model, hashed by parameter name as MLX does (``weight``,
``bias``, ``e_score_correction_bias``), so an MLX model converted from the same checkpoint at
the same precision has the same fingerprint."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..memory.file_format import MemoryData, MemoryMismatchError, parameter_hash
from .arch import model_type, moe_blocks, own_router, routing_map, spec_for


class Memory(MemoryData):
    """Per-layer keys and optimised router logits as torch tensors (``device`` on load)."""

    @staticmethod
    def write_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)

    @staticmethod
    def read_file(path: Path, device=None) -> tuple[dict, dict[str, str]]:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()

    @staticmethod
    def from_numpy(x: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(x))
        return out.to(like.device) if like is not None else out

    @staticmethod
    def dtype_name(x: torch.Tensor) -> str:
        return str(x.dtype).removeprefix("torch.")


def router_hash(router: nn.Module) -> str:
    named = dict(router.named_parameters(recurse=False))
    named.update(router.named_buffers(recurse=False))
    return parameter_hash(
        (name, Memory.to_numpy(v) if v.dtype == torch.bfloat16 else v.detach().cpu().numpy())
        for name, v in named.items()
    )


def fingerprint(model: nn.Module) -> dict:
    """What a memory must agree with: architecture, sizes, MoE layers, router weights."""
    spec = spec_for(model)
    blocks = moe_blocks(model)
    rmap = routing_map(next(iter(blocks.values())), spec)
    return {
        "model_type": model_type(model),
        "hidden_size": int(model.config.hidden_size),
        "num_experts": rmap.n_experts,
        "top_k": rmap.top_k,
        "moe_layers": sorted(blocks),
        "router_hash": {str(i): router_hash(own_router(b, spec)) for i, b in blocks.items()},
    }


def validate_for_model(memory: MemoryData, model: nn.Module) -> list[str]:
    """Raise MemoryMismatchError naming every structural difference; warn about (and return)
    differences that still work (top-k, router weights)."""
    theirs = fingerprint(model)
    problems, notes = memory.mismatches(theirs, memory.layers)
    if problems:
        raise MemoryMismatchError(
            f"{memory.where()} does not fit this model:\n  " + "\n  ".join(problems)
        )
    differ = memory.routers_differing(theirs)
    if differ:
        notes.append(f"router weights differ from the memory's in layers {differ}")
    for note in notes:
        warnings.warn(f"{memory.where()}: {note}", stacklevel=3)
    return notes
