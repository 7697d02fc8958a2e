"""PyTorch companion of kNN-MoE on Hugging Face transformers models (``mlx_knnmoe[torch]``).

The same algorithm as the MLX package, on the exact search path, on CPU or CUDA: router
wrappers for olmoe, qwen2_moe, qwen3_moe, mixtral, gpt_oss and deepseek_v3 (``arch``,
``router``), the mixing modes ``topk``, ``logits`` and ``union`` with rbf or cosine
similarity (``mixing``, ``search``, ``layer_memory``), the builder with torch.autograd
(``gradient``, ``pipeline``, ``eta_choice``, ``recapture``; calibration by the shared rule
of ``mlx_knnmoe.build.calibrate_rule`` in ``refine``, ``calibrate``, ``guard``) and the same
memory file (``store``, on the shared ``mlx_knnmoe.memory.file_format``). Module and
function names, arguments and return orders follow the MLX side. ``python -m
mlx_knnmoe.pytorch.parity`` compares a checkpoint with its MLX conversion; ``python -m
mlx_knnmoe.pytorch.build_memory`` builds a memory on a GPU machine.

    from mlx_knnmoe.pytorch import load_model, attach, build_memory
    model, tokenizer = load_model("allenai/OLMoE-1B-7B-0125-Instruct", device="cuda")
    memory = build_memory(model, tokenizer, "ref.jsonl", eta=1.0, out="med.st")
    attach(model, "med.st")
"""

from ..config import BuildConfig, KNNConfig
from ..memory.file_format import MemoryFormatError, MemoryMismatchError
from .arch import SPECS
from .gradient import optimise_batch, target_nll
from .loading import load_model, resolve_device
from .pipeline import build_memory
from .router import (
    attach,
    capture_router_inputs,
    configure,
    detach,
    install,
    record_routing,
)
from .store import Memory, fingerprint, validate_for_model

__all__ = [
    "BuildConfig",
    "KNNConfig",
    "Memory",
    "MemoryFormatError",
    "MemoryMismatchError",
    "SPECS",
    "attach",
    "build_memory",
    "capture_router_inputs",
    "configure",
    "detach",
    "fingerprint",
    "install",
    "load_model",
    "optimise_batch",
    "record_routing",
    "resolve_device",
    "target_nll",
    "validate_for_model",
]
