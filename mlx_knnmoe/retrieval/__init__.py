"""Inference with a memory: search, mixing arithmetic, the per-layer memory, the router wrapper."""
