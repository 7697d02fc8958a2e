"""Compress a kNN-MoE memory; the same as `mlx_knnmoe.compress_memory`.

    python convert/compress_memory.py med.st med-small.st --keys int8 --pca 256 \
        --prune --model qwen3-bf16

Memories need no conversion between MLX and the PyTorch companion: both read and write the
same safetensors file (mlx_knnmoe/memory/file_format.py describes it).
"""

from mlx_knnmoe.commands.compress_memory import main

if __name__ == "__main__":
    main()
