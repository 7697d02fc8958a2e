"""The builder's hooks on the router wrappers, through their one public ``tap``.

A tap sees each call's router inputs ``x`` and logits ``z``; what it returns (if anything)
replaces the router's logits. The builder uses three: recording (x, z), zero offsets added to
``stop_gradient(z)`` (their gradient is dNLL/dr at r = z), and free logits ``r`` in place of
``x W_r`` (later steps, S > 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..retrieval.attach import installed
from ..retrieval.router import Tap


def _flat(a: mx.array) -> mx.array:
    return a.reshape(-1, a.shape[-1])


@contextmanager
def tapped(model: nn.Module, taps: dict[int, Tap]) -> Iterator[None]:
    """Each MoE layer's router runs ``taps[layer]`` for the duration."""
    with installed(model) as found:
        for layer, router in found.items():
            router.tap = taps.get(layer)
        try:
            yield
        finally:
            for router in found.values():
                router.tap = None


@contextmanager
def capture_router_inputs(model: nn.Module) -> Iterator[dict[int, list]]:
    """Records (router input [T, d], router logits [T, N]) per MoE layer and call."""
    records: dict[int, list] = {}
    with installed(model) as found:

        def recorder(sink: list) -> Tap:
            return lambda x, z: sink.append((_flat(x), _flat(z)))

        with tapped(model, {layer: recorder(records.setdefault(layer, [])) for layer in found}):
            yield records


@contextmanager
def offset_logits(model: nn.Module, offsets: dict[int, mx.array]) -> Iterator[dict[int, list]]:
    """Router outputs ``r = stop_gradient(z) + offset`` ([B*L, N] per layer); also records
    (x, z) per layer and call, as ``capture_router_inputs`` does."""
    records: dict[int, list] = {layer: [] for layer in offsets}

    def tap(layer: int) -> Tap:
        def run(x, z):
            records[layer].append((_flat(x), _flat(z)))
            return mx.stop_gradient(z).astype(mx.float32) + offsets[layer].reshape(z.shape)

        return run

    with tapped(model, {layer: tap(layer) for layer in offsets}):
        yield records


@contextmanager
def free_logits(model: nn.Module, free: dict[int, mx.array]) -> Iterator[None]:
    """Router outputs replaced by the logits ``free[layer]`` [B*L, N]."""
    with tapped(model, {layer: (lambda x, z, r=r: r) for layer, r in free.items()}):
        yield
