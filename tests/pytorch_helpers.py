"""Tiny transformers checkpoints and their MLX conversions, for the PyTorch parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARITY_ARCHS = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")


def quiet(_):
    pass


def make_pair(root: Path, arch: str, seed: int = 0) -> tuple[Path, Path]:
    """A transformers checkpoint (N(0, 0.1) weights; DeepSeek-V3's correction bias random
    too, so the bias path is exercised) and its conversion by ``mlx_knnmoe.convert``."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlx_knnmoe.conversion.convert_model import convert_model
    from tests.tiny_models import make_hf_checkpoint

    hf_dir = make_hf_checkpoint(root / "hf", arch, seed=seed, std=0.1)
    if arch == "deepseek_v3":
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
        model.save_pretrained(hf_dir)
    mlx_dir = convert_model(str(hf_dir), root / "mlx", log=quiet)
    return hf_dir, mlx_dir


def load_pair(hf_dir: Path, mlx_dir: Path):
    from mlx_lm import load as mlx_load

    from mlx_knnmoe.pytorch import load_model

    torch_model, _ = load_model(hf_dir, device="cpu", dtype="float32")
    return torch_model, mlx_load(str(mlx_dir))[0]


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def random_tokens(seed: int, shape, vocab: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)
