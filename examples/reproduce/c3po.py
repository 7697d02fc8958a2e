"""C3PO-style test-time re-mixing, a baseline for kNN-MoE on the bundled model.

C3PO-style re-mixing (``c3po_arrays``; after arXiv 2504.07964, simplified): the reference
prompts the plain model solves (its greedy completion equals the gold one, checked by
teacher forcing: the argmax prediction at every answer position is the gold token; for a
multiple-choice reference file, the gold choice scores best) are stored with their prompt
embedding and, per MoE layer, the dense softmax of the router logits at their last prompt
token. An evaluated sequence is embedded the same way, its ``n_neighbours`` most
cosine-similar solved reference prompts are found, and the mean of their routing
distributions replaces the router output in every MoE layer for every token of that
sequence (the block still applies its own top-k selection and renormalisation), or with
``tokens="last"`` (``--modes c3po-last``) only at its last prompt token, the position whose
routing the references supply (C3PO's ablations reportedly favour re-mixing the last token
only). C3PO embeds prompts with a sentence-embedding model; none is available offline, so
the embedding here is the mean over the prompt tokens of the model's own final hidden states
(after the final norm). Not implemented: C3PO's kernel weighting of the neighbours, its
interpolation with the sample's own routing, its neighbourhood gradient descent, and its
restriction to critical layers and core experts; this is plain k-NN averaging in all layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_knnmoe import detach
from mlx_knnmoe.arch.specs import get_path, moe_layers, routing_map, set_path, spec_for
from mlx_knnmoe.data.batches import length_groups, make_batch
from mlx_knnmoe.data.examples import Example, encode_pair, load_dataset
from mlx_knnmoe.data.formats import MC_FORMATS, MultipleChoice, detect_format, multiple_choice
from mlx_knnmoe.data.records import read_records
from mlx_knnmoe.evaluation.scoring import score_choices, score_text


class _RecordingGate(nn.Module):
    """Passes the router through and keeps its logits."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = sink

    def __call__(self, x: mx.array) -> mx.array:
        z = self.inner(x)
        self._sink.append(z)
        return z


class _FixedGate(nn.Module):
    """Returns the logits of a fixed routing distribution at every position, or only at
    ``position`` (the router's own logits elsewhere)."""

    def __init__(self, inner: nn.Module, logits: mx.array, position: int | None = None):
        super().__init__()
        self.inner = inner
        self._logits = logits  # [N]
        self._position = position

    def __call__(self, x: mx.array) -> mx.array:
        n = self._logits.shape[-1]
        fixed = mx.broadcast_to(self._logits, (*x.shape[:-1], n)).astype(x.dtype)
        if self._position is None:
            return fixed
        at = (mx.arange(x.shape[-2]) == self._position)[:, None]
        return mx.where(at, fixed, self.inner(x))


@contextmanager
def _gates(model: nn.Module, make: Callable[[int, nn.Module], nn.Module]) -> Iterator[None]:
    """Replace every MoE block's gate by ``make(layer, gate)``; restore the originals after."""
    detach(model)
    spec = spec_for(model)
    if spec.gate_returns != "logits":
        raise ValueError("C3PO-style re-mixing needs a gate that returns router logits")
    blocks = moe_layers(model)
    originals = {layer: get_path(block, spec.gate) for layer, block in blocks.items()}
    try:
        for layer, block in blocks.items():
            set_path(block, spec.gate, make(layer, originals[layer]))
        yield
    finally:
        for layer, block in blocks.items():
            set_path(block, spec.gate, originals[layer])


def _groups(lengths: list[int]) -> list[list[int]]:
    return length_groups(lengths, 4096)


def prompt_embeddings(model: nn.Module, prompts: list[list[int]]) -> np.ndarray:
    """[n, d]: mean of the model's final hidden states over each prompt's tokens."""
    out = None
    examples = [Example(p, [0] * len(p), "") for p in prompts]
    for group in _groups([len(p) for p in prompts]):
        batch = make_batch(examples, group)
        h = model.model(batch.tokens).astype(mx.float32)
        n = mx.array([len(prompts[i]) for i in group])
        mask = (mx.arange(h.shape[1])[None, :] < n[:, None]).astype(mx.float32)
        if out is None:
            out = np.zeros((len(prompts), h.shape[-1]), dtype=np.float32)
        out[group] = np.array((h * mask[..., None]).sum(axis=1) / n[:, None])
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _mc_prompt(tokenizer, item: MultipleChoice) -> list[int]:
    return encode_pair(tokenizer, item.prompt, item.choices[0])[0]


def _text_prompt(example: Example) -> list[int]:
    first = example.loss_mask.index(1) if 1 in example.loss_mask else len(example.tokens)
    return example.tokens[:first]


@dataclass
class C3POReference:
    """The solved reference prompts: embeddings [m, d] and routing [m, layers, N]."""

    embeddings: np.ndarray
    routing: np.ndarray
    layers: list[int]
    total: int  # reference examples before keeping the solved ones


def c3po_reference(model: nn.Module, tokenizer, ref_path: str | Path) -> C3POReference:
    """Embed the reference prompts the plain model solves and record their routing at the
    last prompt token (the dense softmax over experts of the router logits, per MoE layer)."""
    records = list(read_records(ref_path))
    fmt = detect_format(records[0][1]) if records else "completion"
    if fmt in MC_FORMATS:
        items = [multiple_choice(r, fmt) for _, r in records]
        solved = score_choices(model, tokenizer, items).acc > 0
        prompts = [_mc_prompt(tokenizer, it) for it in items]
        seqs = prompts
    else:
        examples = load_dataset(ref_path, tokenizer, "completion", shuffle=False).examples
        prompts = [_text_prompt(e) for e in examples]
        seqs = [e.tokens for e in examples]
        solved = np.zeros(len(examples), dtype=bool)
    spec = spec_for(model)
    layers = sorted(moe_layers(model))
    maps = {layer: routing_map(spec, moe_layers(model)[layer]) for layer in layers}
    n_exp = maps[layers[0]].n_experts
    routing = np.zeros((len(prompts), len(layers), n_exp), dtype=np.float32)
    sinks: dict[int, list] = {layer: [] for layer in layers}
    seq_examples = [Example(s, [0] * len(s), "") for s in seqs]
    with _gates(model, lambda layer, gate: _RecordingGate(gate, sinks[layer])):
        for group in _groups([len(s) for s in seqs]):
            for sink in sinks.values():
                sink.clear()
            batch = make_batch(seq_examples, group)
            logits = model(batch.tokens)
            last = mx.array([len(prompts[i]) - 1 for i in group])
            rows = mx.arange(len(group))
            for j, layer in enumerate(layers):
                z = sinks[layer][0][rows, last]
                routing[group, j] = np.array(maps[layer].scores(z))
            if fmt not in MC_FORMATS:
                pred = np.array(logits.argmax(axis=-1))
                for b, i in enumerate(group):
                    e = examples[i]
                    pos = [t for t, m in enumerate(e.loss_mask) if m]
                    solved[i] = all(pred[b, t - 1] == e.tokens[t] for t in pos)
    keep = np.flatnonzero(solved)
    emb = prompt_embeddings(model, [prompts[i] for i in keep])
    return C3POReference(emb, routing[keep], layers, len(prompts))


def _neighbour_routing(ref: C3POReference, emb: np.ndarray, n_neighbours: int) -> np.ndarray:
    """[n, layers, N]: mean routing of each row's most cosine-similar solved references."""
    if len(ref.embeddings) == 0:
        raise ValueError("the plain model solves none of the reference prompts")
    k = min(n_neighbours, len(ref.embeddings))

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    sims = unit(emb) @ unit(ref.embeddings).T
    nearest = np.argsort(-sims, axis=-1, kind="stable")[:, :k]
    return ref.routing[nearest].mean(axis=1)


def c3po_arrays(
    model: nn.Module,
    tokenizer,
    ref_path: str | Path,
    items: list[MultipleChoice] | None = None,
    examples: list[Example] | None = None,
    n_neighbours: int = 3,
    reference: C3POReference | None = None,
    tokens: str = "all",
) -> dict:
    """Per-example arrays of the C3PO-style baseline, as ``evaluate_variant(...)["arrays"]``:
    acc, acc_norm, prompt_nll for multiple-choice ``items``; else nll, targets, prompt_nll
    for text ``examples``. ``reference`` (from ``c3po_reference``) skips rebuilding it.
    ``tokens``: the neighbours' routing replaces the router at ``all`` tokens of the
    sequence, or only at the ``last`` prompt token (the position the references supply)."""
    if items is None and examples is None:
        raise ValueError("pass items (multiple choice) or examples (text)")
    if tokens not in ("all", "last"):
        raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
    detach(model)
    ref = reference or c3po_reference(model, tokenizer, ref_path)
    if items is not None:
        prompts = [_mc_prompt(tokenizer, it) for it in items]
    else:
        prompts = [_text_prompt(e) for e in examples]
    mixed = _neighbour_routing(ref, prompt_embeddings(model, prompts), n_neighbours)
    spec = spec_for(model)
    blocks = moe_layers(model)
    inverse = {layer: routing_map(spec, blocks[layer]).inverse for layer in ref.layers}
    n = len(prompts)
    if items is not None:
        acc, acc_norm, prompt_nll = np.zeros(n), np.zeros(n), np.zeros(n)
    else:
        nll, targets = np.zeros(n), np.zeros(n)
    for i in range(n):
        logits = {
            layer: inverse[layer](mx.array(mixed[i, j])) for j, layer in enumerate(ref.layers)
        }
        at = len(prompts[i]) - 1 if tokens == "last" else None

        def make(layer: int, gate: nn.Module, lg: dict = logits, at: int | None = at):
            return _FixedGate(gate, lg[layer], at)

        with _gates(model, make):
            if items is not None:
                s = score_choices(model, tokenizer, [items[i]])
                acc[i], acc_norm[i], prompt_nll[i] = s.acc[0], s.acc_norm[0], s.prompt_nll[0]
            else:
                a, t = score_text(model, [examples[i]])
                nll[i], targets[i] = a[0], t[0]
    if items is not None:
        return {"acc": acc, "acc_norm": acc_norm, "prompt_nll": prompt_nll}
    return {"nll": nll, "targets": targets, "prompt_nll": nll / np.maximum(targets, 1)}
