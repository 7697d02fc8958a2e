"""Answers for prompts without them (``build_memory --pseudo-labels``): greedy generation
with mlx-lm by the model itself or by a teacher that shares its tokenizer.

Prompts come from the dataset file: a record's ``prompt`` (the completion format without
its ``completion``; a ``completion`` that is there is ignored and replaced), or a record's
``text`` (plain text, a ``.txt`` document: the whole text is the prompt and the answer is its
continuation). Each prompt gets its greedy continuation (at most ``max_tokens`` tokens,
stopping at an end token) and becomes an example as a gold completion record does: the
prompt's tokens, then the answer's tokens, which alone are targets. The prompt keeps its
last ``max_seq_len - max_tokens`` tokens. Prompts whose answer is empty give no example.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

from ..config import BuildConfig
from ..data.examples import Dataset, Example, file_sha256
from ..data.records import DataError, read_records

PROMPT_FORMATS = ("auto", "completion", "text")  # where a prompt is read from


def prompt_of(record: dict, fmt: str = "auto", source: str = "record") -> str:
    """The prompt of a record: its ``prompt`` (format completion) or its ``text``."""
    name = {"completion": "prompt", "text": "text"}.get(fmt)
    if name is None:
        name = "prompt" if "prompt" in record else "text" if "text" in record else None
    if name is None or name not in record:
        found = ", ".join(map(str, record)) or "none"
        wanted = f"'{name}'" if name else "'prompt' or 'text'"
        raise DataError(f"{source}: pseudo-labels need a field {wanted} (found fields: {found})")
    if not isinstance(record[name], str):
        kind = type(record[name]).__name__
        raise DataError(f"{source}: field '{name}': expected a string, found {kind}")
    return record[name]


def read_prompts(
    path: str | Path, fmt: str = "auto", max_prompts: int | None = None
) -> list[tuple[str, str]]:
    """``(source, prompt)`` of a dataset file's first ``max_prompts`` records (all: None)."""
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"pseudo-labels read prompts of format auto, completion or text, not {fmt}")
    records = itertools.islice(read_records(path), max_prompts)
    prompts = [(source, prompt_of(record, fmt, source)) for source, record in records]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def check_same_vocab(tokenizer, teacher_tokenizer, teacher: str) -> None:
    """Raise ValueError (one line) unless the teacher's vocabulary is the model's: the same
    token strings with the same ids."""
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours == theirs:
        return
    differ = sum(theirs.get(t) != i for t, i in ours.items()) + len(theirs.keys() - ours.keys())
    raise ValueError(
        f"teacher {teacher}: its tokenizer differs from the model's ({len(theirs)} tokens "
        f"against {len(ours)}, {differ} token strings with another id or missing); "
        "a teacher must share the model's tokenizer"
    )


def greedy_answer(
    model: nn.Module, tokenizer, prompt: str, max_tokens: int, room: int
) -> tuple[list[int], list[int]]:
    """The prompt's token ids (its last ``room``) and those of its greedy continuation (at
    most ``max_tokens``, stopping at an end token)."""
    ids = [int(t) for t in tokenizer.encode(prompt)][-room:]
    stop = set(tokenizer.eos_token_ids)
    out: list[int] = []
    steps = generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=_argmax)
    for token, _ in steps:
        token = int(token)
        if token in stop:
            break
        out.append(token)
    return ids, out


def _argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def pseudo_examples(
    model: nn.Module, tokenizer, prompts: list[tuple[str, str]], max_tokens: int, room: int
) -> list[Example]:
    """One example per prompt with a non-empty answer: the prompt's tokens, then the greedy
    answer's tokens as the targets (the generated ids themselves: decoding and encoding again
    could split a byte-level token differently)."""
    examples = []
    for source, prompt in prompts:
        if not tokenizer.encode(prompt):
            raise DataError(f"{source}: the prompt is empty")
        ids, answer = greedy_answer(model, tokenizer, prompt, max_tokens, room)
        if answer:  # nothing predicts the first token, so it is never a target
            mask = [0] * len(ids) + [1] * len(answer)
            examples.append(Example(ids + answer, [0, *mask[1:]], source))
    return examples


def pseudo_label_dataset(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    config: BuildConfig,
    teacher: tuple[nn.Module, object] | None = None,
) -> tuple[Dataset, dict]:
    """The examples of ``path``'s prompts (at most ``config.max_examples``) with answers
    generated by ``teacher`` (a loaded ``(model, tokenizer)`` sharing the model's tokenizer)
    or by ``model``, in ``config.max_seq_len`` tokens, shuffled with ``config.seed`` as
    ``load_dataset`` does; and what the generation did (prompts, empty answers, seconds)."""
    if teacher is not None:
        check_same_vocab(tokenizer, teacher[1], config.teacher or "model")
    generator = teacher[0] if teacher is not None else model
    path = Path(path)
    prompts = read_prompts(path, config.format, config.max_examples)
    room = max(config.max_seq_len - config.pseudo_max_tokens, 1)
    started = time.perf_counter()
    examples = pseudo_examples(generator, tokenizer, prompts, config.pseudo_max_tokens, room)
    seconds = time.perf_counter() - started
    if not examples:
        raise DataError(f"{path}: every generated answer was empty")
    info = {
        "prompts": len(prompts),
        "empty_answers": len(prompts) - len(examples),
        "seconds": round(seconds, 2),
    }
    random.Random(config.seed).shuffle(examples)
    return Dataset(path.stem, str(path), file_sha256(path), "completion", examples), info
