"""Log-likelihood scoring: multiple-choice answers (as lm-evaluation-harness scores them) and
per-example NLL of text, with whatever memory is attached to the model."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.batches import length_groups, make_batch
from ..data.examples import Example, encode_pair
from ..data.formats import TARGET_DELIMITER, MultipleChoice
from ..retrieval.attach import count_positions


@dataclass
class ChoiceScores:
    loglik: np.ndarray  # [n, C] summed log p(choice | prompt)
    gold: np.ndarray  # [n]
    choice_chars: np.ndarray  # [n, C] characters of each choice, delimiter excluded
    prompt_nll: np.ndarray  # [n] mean NLL per prompt token after the first (zero-shot ppl)

    @property
    def acc(self) -> np.ndarray:
        return (self.loglik.argmax(-1) == self.gold).astype(np.float64)

    @property
    def acc_norm(self) -> np.ndarray:
        """lm-eval's acc_norm: log-likelihood divided by the choice's length in characters."""
        return ((self.loglik / self.choice_chars).argmax(-1) == self.gold).astype(np.float64)


def _log_probs(model: nn.Module, tokens: mx.array) -> mx.array:
    logits = model(tokens).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def score_choices(
    model: nn.Module, tokenizer, items: list[MultipleChoice], batch_tokens: int = 4096
) -> ChoiceScores:
    """Sum of log p over each choice's tokens after the prompt. Sequences are prompt+choice;
    when every choice of an item is one token, the prompt alone gives all of them at once."""
    encoded = []
    for item in items:
        pairs = [encode_pair(tokenizer, item.prompt, c) for c in item.choices]
        encoded.append(pairs)
    rows = []  # (item, choice or None for "all single-token", tokens, n_continuation)
    for i, pairs in enumerate(encoded):
        if all(len(c) == 1 for _, c in pairs) and len({tuple(p) for p, _ in pairs}) == 1:
            rows.append((i, None, pairs[0][0], 0))
        else:
            rows += [(i, j, p + c, len(c)) for j, (p, c) in enumerate(pairs)]
    n_choices = max(len(it.choices) for it in items)
    loglik = np.full((len(items), n_choices), -np.inf)
    prompt_nll = np.zeros(len(items))
    examples = [Example(r[2], [0] + [1] * (len(r[2]) - 1), "") for r in rows]
    for group in length_groups([len(e.tokens) for e in examples], batch_tokens):
        batch = make_batch(examples, group)
        count_positions(model, _real(examples, group, batch.tokens.shape[1]))
        lp = np.array(_log_probs(model, mx.array(batch.tokens)))
        toks = batch.tokens
        for b, r in enumerate(group):
            i, j, seq, n_cont = rows[r]
            n = len(seq)
            if j is None:  # the next-token distribution after the prompt scores every choice
                last = lp[b, n - 1]
                loglik[i, : len(encoded[i])] = [last[c[0]] for _, c in encoded[i]]
                n_prompt = n
            else:
                pos = np.arange(n - n_cont, n)
                loglik[i, j] = lp[b, pos - 1, toks[b, pos]].sum()
                n_prompt = n - n_cont
            if n_prompt > 1:
                pos = np.arange(1, n_prompt)
                prompt_nll[i] = -lp[b, pos - 1, toks[b, pos]].mean()
    chars = np.ones((len(items), n_choices))
    for i, item in enumerate(items):
        for j, c in enumerate(item.choices):
            text = c[len(TARGET_DELIMITER) :] if c.startswith(TARGET_DELIMITER) else c
            chars[i, j] = max(len(text), 1)
    count_positions(model, None)
    gold = np.array([it.gold for it in items])
    return ChoiceScores(loglik, gold, chars, prompt_nll)


def score_text(
    model: nn.Module, examples: list[Example], batch_tokens: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed NLL of its target tokens, and the number of targets."""
    nll = np.zeros(len(examples))
    targets = np.array([sum(e.loss_mask) for e in examples], dtype=np.float64)
    for group in length_groups([len(e.tokens) for e in examples], batch_tokens):
        batch = make_batch(examples, group)
        tokens, loss_mask = mx.array(batch.tokens), mx.array(batch.loss_mask)
        count_positions(model, _real(examples, group, tokens.shape[1] - 1, fed=-1))
        logits = model(tokens[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        per_row = np.array((ce * loss_mask[:, 1:]).sum(axis=-1))
        nll[group] = per_row
    count_positions(model, None)
    return nll, targets


def _real(examples: list[Example], rows: list[int], width: int, fed: int = 0) -> np.ndarray:
    """[B, width] 1 at the positions of right-padded rows that a row alone would feed the
    model (its length + ``fed`` tokens), 0 elsewhere."""
    lengths = np.array([len(examples[i].tokens) + fed for i in rows])
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
