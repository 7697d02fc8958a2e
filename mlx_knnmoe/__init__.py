"""kNN-MoE retrieval-augmented expert routing for MoE models on MLX.

The data flow, one subpackage a stage (ARCHITECTURE.md has the picture): ``data`` (dataset
files to batches) -> ``build`` (the gradient step on the routing logits, eta choice, the
pipeline) -> ``memory`` (the file, its validation, compression) -> ``retrieval`` (search,
mixing, the router wrapper) -> ``evaluation``; ``arch`` holds what differs between
architectures, ``commands`` the console scripts, ``pytorch`` the PyTorch companion.
"""

from .build.pipeline import build_memory
from .build.taps import capture_router_inputs
from .config import BuildConfig, KNNConfig
from .loading import load, load_memory, resolve_memory
from .memory.compress import compress
from .memory.file_format import MemoryFormatError, MemoryMismatchError
from .memory.fingerprint import fingerprint
from .memory.merging import merge_memories
from .memory.store import Memory
from .memory.validation import validate_for_model
from .retrieval.attach import attach, configure, detach, knn_stats, set_stats
from .scripts import install_finder
from .version import __version__

__all__ = [
    "__version__",
    "BuildConfig",
    "KNNConfig",
    "Memory",
    "MemoryFormatError",
    "MemoryMismatchError",
    "attach",
    "build_memory",
    "capture_router_inputs",
    "compress",
    "configure",
    "detach",
    "fingerprint",
    "knn_stats",
    "load",
    "load_memory",
    "merge_memories",
    "resolve_memory",
    "set_stats",
    "validate_for_model",
]

install_finder()  # python -m mlx_knnmoe.<command>
