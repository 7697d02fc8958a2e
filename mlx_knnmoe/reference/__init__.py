"""PyTorch companion of kNN-MoE on Hugging Face transformers models (``mlx_knnmoe[torch]``).

The same algorithm as the MLX package, on the exact search path, on CPU or CUDA: router
wrappers for olmoe, qwen2_moe, qwen3_moe, mixtral, gpt_oss and deepseek_v3 (``routing``,
``router``), the mixing modes ``topk``, ``logits`` and ``union`` with rbf or cosine
similarity (``mixing``, ``search``, ``retrieval``), the builder with torch.autograd
(``build``, ``builder``, ``tuning``) and the same memory file (``memory_io``).
``python -m mlx_knnmoe.reference.parity`` compares a checkpoint with its MLX conversion;
``python -m mlx_knnmoe.reference.build_cli`` builds a memory on a GPU machine.

    from mlx_knnmoe.reference import load_model, attach, build_memory
    model, tokenizer = load_model("allenai/OLMoE-1B-7B-0125-Instruct", device="cuda")
    memory = build_memory(model, tokenizer, "ref.jsonl", eta=1.0, out="med.st")
    attach(model, "med.st")
"""

from ..config import KNNConfig
from .build import optimise_batch, target_nll
from .builder import build_memory
from .loading import load_model, resolve_device
from .memory_io import Memory, MemoryFormatError, MemoryMismatchError, fingerprint
from .router import (
    attach,
    capture_router_inputs,
    configure,
    detach,
    install,
    record_routing,
)
from .routing import SPECS

__all__ = [
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
]
