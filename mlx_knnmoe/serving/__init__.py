"""Serving: mlx-lm's OpenAI-compatible server with memories chosen per request."""
