"""Keys that match what inference sees: re-capture each layer's router inputs with the memory
attached (docs/METHOD.md, "Keys captured with the memory attached").

The gradient pass records every layer's router input under the plain model's routing. At
inference the memory has already re-routed the earlier layers, so a deeper layer's router
input moves away from its key, by more than the bandwidth on natural text. A re-capture pass
runs the same batches with the memory attached and replaces each stored key by the router
input seen there (same tokens, same rows, values kept). Layer 0's keys never move, so pass p
makes layers 0..p consistent: after (MoE layers - 1) passes every key is the router input the
memory itself produces (the fixed point); fewer passes leave the deepest layers close to it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import KNNConfig
from ..data.batches import Batch, stored_rows
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .stages import recapture_passes
from .taps import capture_router_inputs


def router_inputs(model: nn.Module, batches: list[Batch], bar=None) -> dict[int, mx.array]:
    """Each MoE layer's router inputs at the stored positions of ``batches``, in order, with
    whatever memory is attached to the model."""
    parts: dict[int, list[mx.array]] = {}
    for batch in batches:
        with capture_router_inputs(model) as records:
            mx.eval(model(mx.array(batch.tokens[:, :-1])))
        rows = mx.array(stored_rows(batch.keep_mask))
        for layer, rec in records.items():
            x = mx.concatenate([r[0] for r in rec])[rows]
            mx.eval(x)
            parts.setdefault(layer, []).append(x)
        if bar is not None:
            bar.update(1)
    return {layer: mx.concatenate(p) for layer, p in parts.items()}


def recapture_keys(
    model: nn.Module,
    batches: list[Batch],
    memory: Memory,
    passes: int,
    config: KNNConfig,
    progress: bool = True,
) -> Memory:
    """``memory`` (whose entries are the stored positions of ``batches``, in order) with its
    keys re-captured ``passes`` times with itself attached; values kept, bandwidth
    recalibrated from the new keys. The model is left without a memory."""

    def capture(m: Memory, bar) -> dict[int, mx.array]:
        attach(model, m, config, validate=False)
        inputs = router_inputs(model, batches, bar)
        return {layer: inputs[layer].astype(k.dtype) for layer, k in m.keys.items()}

    return recapture_passes(memory, passes, len(batches), capture, lambda: detach(model), progress)
