"""Loading a transformers MoE model for kNN-MoE on a chosen device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``auto``: CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_model(
    path: str | Path, device: str | None = "auto", dtype: str | None = None
) -> tuple[nn.Module, object]:
    """(model in eval mode on ``device``, tokenizer) from a checkpoint directory or Hub id.
    ``dtype``: float32, bfloat16 or float16 (default: the checkpoint's own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": DTYPES[dtype] if dtype else "auto"}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model = model.to(resolve_device(device)).eval()
    return model, AutoTokenizer.from_pretrained(str(path))
