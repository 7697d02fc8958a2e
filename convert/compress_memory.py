"""Compress a kNN-MoE memory; the same as `mlx_knnmoe.convert memory`.

    python convert/compress_memory.py med.st med-small.st --keys int8 --pca 256 \
        --prune --model qwen3-bf16

Memories need no conversion between MLX and the PyTorch reference: it reads and writes the
same safetensors file (memory.py describes the format).
"""

from mlx_knnmoe.convert import memory_command

if __name__ == "__main__":
    memory_command()
