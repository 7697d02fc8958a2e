"""Speed and memory measurements against plain mlx-lm (``mlx_knnmoe.benchmark``)."""
