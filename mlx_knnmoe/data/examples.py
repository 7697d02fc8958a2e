"""Records to token sequences with loss masks.

Loss masks mark the tokens whose prediction counts: every token but the first of a text
window; the completion or target of a prompt (the prompt loses its start if the pair is too
long); the assistant messages of a chat. The first token of an example is never a target;
examples without a target are left out.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .formats import FORMATS, bad_field, detect_format, field, multiple_choice, short, str_field
from .records import DataError, read_records


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the token is a target whose prediction counts
    source: str  # "file:line" of the record


@dataclass
class Dataset:
    name: str
    path: str
    sha256: str
    format: str
    examples: list[Example]

    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)

    def num_targets(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    ids = tokenizer.encode(text) if special else tokenizer.encode(text, add_special_tokens=False)
    return [int(t) for t in ids]


def _example(tokens: list[int], mask: list[int], source: str) -> Example | None:
    mask = [0, *mask[1:]]  # nothing predicts the first token
    return Example(tokens, mask, source) if any(mask) else None


def _text_examples(tokenizer, text: str, max_len: int, source: str) -> list[Example]:
    ids = _encode(tokenizer, text)
    # windows overlap by one token, so every token after the first is a target exactly once
    starts = range(0, max(len(ids) - 1, 1), max_len - 1)
    windows = (ids[i : i + max_len] for i in starts)
    return [e for w in windows if (e := _example(w, [1] * len(w), source))]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-eval does for causal models.

    As in lm_eval/api/model.py ``_encode_pair``: trailing whitespace of the context moves to
    the continuation, and the continuation's ids are the joint encoding past the context's
    ids, so a SentencePiece tokenizer adds no stray word-start token before " A". Where the
    joint encoding does not start with the context's ids, the continuation is encoded alone.
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx, whole = _encode(tokenizer, context), _encode(tokenizer, context + continuation)
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx) :]
    return ctx, _encode(tokenizer, continuation, special=False)


def _pair_example(tokenizer, prompt: str, target: str, max_len: int, source: str):
    p, t = encode_pair(tokenizer, prompt, target)
    if len(p) + len(t) > max_len:
        t = t[: max_len - min(1, len(p))]  # a too-long target loses its end; keep 1 context
        p = p[len(p) + len(t) - max_len :]  # the context loses its start
    return _example(p + t, [0] * len(p) + [1] * len(t), source)


def _chat_ids(tokenizer, messages: list, generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if len(ids) and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = ids[0]
    return [int(t) for t in ids]


def _chat_example(tokenizer, record: dict, max_len: int, source: str) -> Example | None:
    messages = field(record, "messages", "chat")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "chat", "a non-empty list of messages", messages)
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            expected = "an object with 'role' and 'content'"
            raise DataError(f"message {i}: expected {expected}, found {short(m)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("format chat needs a tokenizer with a chat template")
    full = _chat_ids(tokenizer, messages)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _chat_ids(tokenizer, messages[:i], generation_prompt=True)
        upto = _chat_ids(tokenizer, messages[: i + 1])
        if full[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise DataError(
                f"the chat template is not prefix-stable at message {i + 1}: rendering the "
                "conversation up to an assistant message is not a prefix of the full rendering"
            )
        mask[len(prefix) : len(upto)] = [1] * (len(upto) - len(prefix))
    return _example(full[:max_len], mask[:max_len], source)


def _examples(tokenizer, record: dict, fmt: str, max_len: int, seed: int, source: str):
    if fmt == "text":
        return _text_examples(tokenizer, str_field(record, "text", fmt), max_len, source)
    if fmt == "chat":
        example = _chat_example(tokenizer, record, max_len, source)
    else:
        if fmt == "completion":
            pair = str_field(record, "prompt", fmt), str_field(record, "completion", fmt)
        else:
            mc = multiple_choice(record, fmt, seed)
            pair = mc.prompt, mc.choices[mc.gold]
        example = _pair_example(tokenizer, *pair, max_len, source)
    return [example] if example else []


def load_dataset(
    path: str | os.PathLike,
    tokenizer,
    format: str = "auto",
    max_examples: int | None = None,
    max_seq_len: int = 2048,
    seed: int = 0,
    shuffle: bool = True,
) -> Dataset:
    """Tokenise a local dataset file into examples with loss masks (see the module doc).

    ``max_examples``: reading stops once the file has given that many (the first ones in
    file order), which are then shuffled with ``seed`` (``shuffle``)."""
    if format not in FORMATS:
        raise DataError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    for name, value, low in (("max_seq_len", max_seq_len, 2), ("max_examples", max_examples, 1)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    path = Path(path)
    fmt = None if format == "auto" else format
    examples: list[Example] = []
    for source, record in read_records(path):
        try:
            fmt = fmt or detect_format(record)
            examples += _examples(tokenizer, record, fmt, max_seq_len, seed, source)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise DataError(f"{path}: no examples")
    examples = examples[:max_examples]
    if shuffle:
        random.Random(seed).shuffle(examples)
    return Dataset(path.stem, str(path), file_sha256(path), fmt, examples)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
