"""Hugging Face checkpoints to MLX model directories, with memories packaged beside them."""
