"""Hugging Face MoE checkpoint -> MLX model directory; the same as `mlx_knnmoe.convert model`.

    python convert/hf_to_mlx.py --hf-path Qwen/Qwen3-30B-A3B --mlx-path qwen3-4bit -q \
        --memory med=med.st
"""

from mlx_knnmoe.convert import model_command

if __name__ == "__main__":
    model_command()
