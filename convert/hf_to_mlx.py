"""Hugging Face MoE checkpoint -> MLX model directory; the same as `mlx_knnmoe.convert`.

    python convert/hf_to_mlx.py --hf-path Qwen/Qwen3-30B-A3B --mlx-path qwen3-4bit -q \
        --memory med=med.st
"""

from mlx_knnmoe.commands.convert import main

if __name__ == "__main__":
    main()
