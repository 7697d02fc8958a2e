"""Scoring a model with or without a memory, paired bootstrap statistics, side-by-side tables."""
