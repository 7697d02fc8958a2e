"""A guard set sampled from a transformers model (the MLX builder's build/guard.py in torch):
text the model samples itself, by construction from the distribution it was trained on. The
same seed gives the same text on one device; it is not token for token the MLX sampler's
(the frameworks draw random numbers differently). A guard file reads alike on both sides
(``build.calibrate_rule.guard_examples``)."""

from __future__ import annotations

import torch
from torch import nn

from ..build.calibrate_rule import sampled_guard
from ..data.examples import Example


@torch.no_grad()
def sample_guard(
    model: nn.Module, start_token: int, count: int = 32, length: int = 64, seed: int = 0
) -> list[Example]:
    """``count`` sequences of ``length`` tokens sampled at temperature 1 from ``start_token``
    (one batch, without a KV cache); every token after the first is a target."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.full((count, 1), start_token, dtype=torch.long, device=device)
    for _ in range(length - 1):
        logits = model(input_ids=tokens, use_cache=False).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        new = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, new], dim=1)
    return sampled_guard(tokens.tolist())
