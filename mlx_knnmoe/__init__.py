"""kNN-MoE retrieval-augmented expert routing for MoE models on MLX."""

__version__ = "0.1.0"  # first: submodules record it in the files they write

from .builder import build_memory
from .config import KNNConfig
from .loading import load, resolve_memory
from .memory import Memory, MemoryFormatError, MemoryMismatchError, fingerprint
from .router import attach, capture_router_inputs, configure, detach, knn_stats, set_stats

__all__ = [
    "KNNConfig",
    "Memory",
    "MemoryFormatError",
    "MemoryMismatchError",
    "attach",
    "build_memory",
    "capture_router_inputs",
    "configure",
    "detach",
    "fingerprint",
    "knn_stats",
    "load",
    "resolve_memory",
    "set_stats",
]
