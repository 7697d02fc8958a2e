"""The memory in MLX arrays: ``Memory``, the file format of file_format.py read and written with
``mx.load`` / ``mx.save_safetensors``."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .file_format import MemoryData


class Memory(MemoryData):
    """Per-layer keys (router inputs) and optimised router logits, with their metadata.

    ``Memory.load(path)`` reads a file; ``memory.save(path)`` writes one atomically.
    ``memory.validation.validate_for_model`` checks it against a model (``attach`` does).
    """

    @staticmethod
    def write_file(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
        mx.save_safetensors(str(path), tensors, metadata=metadata)

    @staticmethod
    def read_file(path: Path, device=None) -> tuple[dict[str, mx.array], dict[str, str]]:
        return mx.load(str(path), format="safetensors", return_metadata=True)

    @staticmethod
    def to_numpy(x: mx.array) -> np.ndarray:
        return np.asarray(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)

    @staticmethod
    def from_numpy(x: np.ndarray, like=None) -> mx.array:
        return mx.array(x)

    @staticmethod
    def dtype_name(x: mx.array) -> str:
        return str(x.dtype).removeprefix("mlx.core.")
