"""Local datasets (jsonl, json, csv, txt, parquet) to token sequences with loss masks.

Multiple-choice formats render prompts exactly as EleutherAI's lm-evaluation-harness does
(zero-shot, no description): the prompt is the context, and the target is the target
delimiter " " followed by the gold choice label. Loss masks mark the tokens whose
prediction counts: every token but the first of a text window; the completion or target
of a prompt (the prompt loses its start if the pair is too long); the assistant messages
of a chat. The first token of an example is never a target; examples without a target are
left out.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "text", "completion", "chat", "medmcqa", "medqa", "mmlu", "gpqa")
MC_FORMATS = ("medmcqa", "medqa", "mmlu", "gpqa")
EXTENSIONS = (".jsonl", ".json", ".csv", ".txt", ".parquet")
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter (lm_eval/config/task.py)
LETTERS = ("A", "B", "C", "D")


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message says where and why."""


@dataclass
class MultipleChoice:
    prompt: str
    choices: list[str]  # the continuation strings, e.g. [" A", " B", " C", " D"]
    gold: int


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


# ---------------------------------------------------------------------------- reading files


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``(source, record)`` for each record of a local file, in file order."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; supported: {', '.join(EXTENSIONS)}"
        )
    if ext == ".parquet":
        yield from _parquet_records(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if ext == ".jsonl":
        items = _jsonl_records(path, text)
    elif ext == ".json":
        items = _json_records(path, text)
    elif ext == ".csv":
        items = _csv_records(path, text)
    else:
        items = _txt_records(path, text)
    for source, record in items:
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected an object, found {type(record).__name__}")
        yield source, record


def _jsonl_records(path: Path, text: str):
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg}, column {e.colno})") from None


def _json_records(path: Path, text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a list of records or an object with one list-valued key, "
                f"found an object with list-valued keys {lists}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, found {type(data).__name__}")
    for i, record in enumerate(data, 1):
        yield f"{path}:item {i}", record


def _csv_records(path: Path, text: str):
    reader = csv.DictReader(text.splitlines(keepends=True))
    for i, row in enumerate(reader):
        source = f"{path}:{i + 2}"  # 1-based line of the row, counting the header
        if None in row:
            raise DataError(f"{source}: row has more fields than the header")
        yield source, row


def _txt_records(path: Path, text: str):
    """Documents separated by one or more blank lines; source is the document's first line."""
    lines: list[str] = []
    start = 0
    for i, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            start = start or i
            lines.append(line)
        elif lines:
            yield f"{path}:{start}", {"text": "\n".join(lines)}
            lines, start = [], 0


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)"
        ) from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


# ----------------------------------------------------------------------- record validation


def _field(record: dict, name: str, fmt: str):
    if name not in record:
        found = ", ".join(map(str, record)) or "none"
        raise DataError(f"missing field '{name}' for format {fmt} (found fields: {found})")
    return record[name]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(name: str, fmt: str, expected: str, value) -> DataError:
    return DataError(f"field '{name}' for format {fmt}: expected {expected}, found {_short(value)}")


def _str(record: dict, name: str, fmt: str) -> str:
    value = _field(record, name, fmt)
    if not isinstance(value, str):
        raise _bad(name, fmt, "a string", value)
    return value


def _index(record: dict, name: str, fmt: str, letters: bool = False, hint: str = "") -> int:
    """An answer index 0-3: an int, a digit string (CSV), or with ``letters`` A-D."""
    value = _field(record, name, fmt)
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    elif letters and isinstance(value, str) and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if index not in range(4):
        expected = "an integer 0-3" + (" or a letter A-D" if letters else "")
        raise _bad(name, fmt, expected + hint, value)
    return index


def _choices_list(record: dict, name: str, fmt: str) -> list[str]:
    value = _field(record, name, fmt)
    if isinstance(value, str):  # a list encoded in a CSV cell: JSON, or Python's repr
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(value)
                break
            except (ValueError, SyntaxError):
                pass
    if not (isinstance(value, (list, tuple)) and len(value) == 4):
        raise _bad(name, fmt, "a list of 4 strings", value)
    if not all(isinstance(c, str) for c in value):
        raise _bad(name, fmt, "a list of 4 strings", value)
    return list(value)


# ------------------------------------------------------------------------ record formats


def detect_format(record: dict) -> str:
    """The record format implied by a record's fields."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "text" in keys:
        return "text"
    if keys & {"opa", "cop"}:
        return "medmcqa"
    if keys & {"sent1", "ending0"}:
        return "medqa"
    if {"question", "choices", "answer"} <= keys:
        return "mmlu"
    if {"Question", "Correct Answer"} <= keys:
        return "gpqa"
    found = ", ".join(map(str, record)) or "none"
    raise DataError(
        f"cannot detect the record format (found fields: {found}); expected fields of one of "
        f"{', '.join(FORMATS[1:])}, or pass the format explicitly"
    )


def _gpqa_preprocess(text: str | None) -> str:
    # lm_eval/tasks/gpqa/zeroshot/utils.py, preprocess() (task version 2.2; older versions
    # also removed "[...]" spans, which lm-eval dropped because it corrupted answer text).
    if text is None:
        return " "
    return text.strip().replace(" [title]", ". ").replace("  ", " ")


def multiple_choice(record: dict, fmt: str, seed: int = 0) -> MultipleChoice:
    """The lm-eval zero-shot prompt, continuation strings and gold index of an MC record."""
    if fmt == "auto":
        fmt = detect_format(record)
    letters = list(LETTERS)
    if fmt == "medmcqa":
        # lm_eval/tasks/medmcqa/utils_medmcqa.py doc_to_text; medmcqa.yaml: target cop,
        # choices A-D.
        options = [_str(record, k, fmt) for k in ("question", "opa", "opb", "opc", "opd")]
        hint = " (the HF convention; the original release numbers options 1-4: subtract 1)"
        gold = _index(record, "cop", fmt, hint=hint)
        body = "".join(f"{x}. {o}\n" for x, o in zip(letters, options[1:]))
        prompt = f"Question: {options[0]}\nChoices:\n{body}Answer:"
    elif fmt == "medqa":
        # lm_eval/tasks/medqa/preprocess_medqa.py doc_to_text / doc_to_target (label);
        # medqa.yaml: choices A-D.
        question = _str(record, "sent1", fmt)
        options = [_str(record, f"ending{i}", fmt) for i in range(4)]
        gold = _index(record, "label", fmt)
        body = "".join(f"{x}. {o}\n" for x, o in zip(letters, options))
        prompt = f"Question: {question}\n{body}Answer:"
    elif fmt == "mmlu":
        # lm_eval/tasks/mmlu/default/_default_template_yaml doc_to_text; target answer.
        question = _str(record, "question", fmt)
        options = _choices_list(record, "choices", fmt)
        gold = _index(record, "answer", fmt, letters=True)
        body = "".join(f"\n{x}. {o}" for x, o in zip(letters, options))
        prompt = f"{question.strip()}{body}\nAnswer:"
    elif fmt == "gpqa":
        # lm_eval/tasks/gpqa/zeroshot/utils.py process_docs (shuffle [I1, I2, I3, Correct]);
        # _gpqa_zeroshot_yaml doc_to_text, choices "(A)".."(D)". lm-eval shuffles with the
        # global RNG; here the order depends only on (seed, question).
        question = _str(record, "Question", fmt)
        keys = [f"Incorrect Answer {i}" for i in (1, 2, 3)] + ["Correct Answer"]
        for k in keys:
            value = _field(record, k, fmt)
            if value is not None and not isinstance(value, str):
                raise _bad(k, fmt, "a string", value)
        options = [_gpqa_preprocess(record[k]) for k in keys]
        key = hashlib.sha256(f"{seed}\n{question}".encode()).digest()
        random.Random(int.from_bytes(key[:8], "big")).shuffle(options)
        gold = options.index(_gpqa_preprocess(record["Correct Answer"]))
        letters = [f"({x})" for x in LETTERS]
        body = "".join(f"\n{x} {o}" for x, o in zip(letters, options))
        prompt = f"What is the correct answer to this question:{question}\nChoices:{body}\nAnswer:"
    else:
        raise DataError(f"'{fmt}' is not a multiple-choice format; expected one of {MC_FORMATS}")
    return MultipleChoice(prompt, [TARGET_DELIMITER + x for x in letters], gold)


# ---------------------------------------------------------------------------- tokenising


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
    messages = _field(record, "messages", "chat")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "chat", "a non-empty list of messages", messages)
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            expected = "an object with 'role' and 'content'"
            raise DataError(f"message {i}: expected {expected}, found {_short(m)}")
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
        return _text_examples(tokenizer, _str(record, "text", fmt), max_len, source)
    if fmt == "chat":
        example = _chat_example(tokenizer, record, max_len, source)
    else:
        if fmt == "completion":
            pair = _str(record, "prompt", fmt), _str(record, "completion", fmt)
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
    """Tokenise a local dataset file into examples with loss masks (see the module doc)."""
    if format not in FORMATS:
        raise DataError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    path = Path(path)
    fmt = None if format == "auto" else format
    examples: list[Example] = []
    for source, record in read_records(path):
        try:
            fmt = fmt or detect_format(record)
            examples += _examples(tokenizer, record, fmt, max_seq_len, seed, source)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    if shuffle:
        random.Random(seed).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(path.stem, str(path), digest, fmt, examples)
