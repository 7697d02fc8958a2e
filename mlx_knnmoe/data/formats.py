"""Record formats: which fields a record has, and the lm-evaluation-harness prompts of
multiple-choice records (zero-shot, no description: the prompt is the context, the target is
the target delimiter " " followed by the gold choice label)."""

from __future__ import annotations

import ast
import hashlib
import json
import random
from dataclasses import dataclass

from .records import DataError

FORMATS = ("auto", "text", "completion", "chat", "medmcqa", "medqa", "mmlu", "gpqa")
MC_FORMATS = ("medmcqa", "medqa", "mmlu", "gpqa")
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter (lm_eval/config/task.py)
LETTERS = ("A", "B", "C", "D")


@dataclass
class MultipleChoice:
    prompt: str
    choices: list[str]  # the continuation strings, e.g. [" A", " B", " C", " D"]
    gold: int


def field(record: dict, name: str, fmt: str):
    if name not in record:
        found = ", ".join(map(str, record)) or "none"
        raise DataError(f"missing field '{name}' for format {fmt} (found fields: {found})")
    return record[name]


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad_field(name: str, fmt: str, expected: str, value) -> DataError:
    return DataError(f"field '{name}' for format {fmt}: expected {expected}, found {short(value)}")


def str_field(record: dict, name: str, fmt: str) -> str:
    value = field(record, name, fmt)
    if not isinstance(value, str):
        raise bad_field(name, fmt, "a string", value)
    return value


def _index(record: dict, name: str, fmt: str, letters: bool = False, hint: str = "") -> int:
    """An answer index 0-3: an int, a digit string (CSV), or with ``letters`` A-D."""
    value = field(record, name, fmt)
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    elif letters and isinstance(value, str) and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if index not in range(4):
        expected = "an integer 0-3" + (" or a letter A-D" if letters else "")
        raise bad_field(name, fmt, expected + hint, value)
    return index


def _choices_list(record: dict, name: str, fmt: str) -> list[str]:
    value = field(record, name, fmt)
    if isinstance(value, str):  # a list encoded in a CSV cell: JSON, or Python's repr
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(value)
                break
            except (ValueError, SyntaxError):
                pass
    if not (isinstance(value, (list, tuple)) and len(value) == 4):
        raise bad_field(name, fmt, "a list of 4 strings", value)
    if not all(isinstance(c, str) for c in value):
        raise bad_field(name, fmt, "a list of 4 strings", value)
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
        options = [str_field(record, k, fmt) for k in ("question", "opa", "opb", "opc", "opd")]
        hint = " (the HF convention; the original release numbers options 1-4: subtract 1)"
        gold = _index(record, "cop", fmt, hint=hint)
        body = "".join(f"{x}. {o}\n" for x, o in zip(letters, options[1:]))
        prompt = f"Question: {options[0]}\nChoices:\n{body}Answer:"
    elif fmt == "medqa":
        # lm_eval/tasks/medqa/preprocess_medqa.py doc_to_text / doc_to_target (label);
        # medqa.yaml: choices A-D.
        question = str_field(record, "sent1", fmt)
        options = [str_field(record, f"ending{i}", fmt) for i in range(4)]
        gold = _index(record, "label", fmt)
        body = "".join(f"{x}. {o}\n" for x, o in zip(letters, options))
        prompt = f"Question: {question}\n{body}Answer:"
    elif fmt == "mmlu":
        # lm_eval/tasks/mmlu/default/_default_template_yaml doc_to_text; target answer.
        question = str_field(record, "question", fmt)
        options = _choices_list(record, "choices", fmt)
        gold = _index(record, "answer", fmt, letters=True)
        body = "".join(f"\n{x}. {o}" for x, o in zip(letters, options))
        prompt = f"{question.strip()}{body}\nAnswer:"
    elif fmt == "gpqa":
        # lm_eval/tasks/gpqa/zeroshot/utils.py process_docs (shuffle [I1, I2, I3, Correct]);
        # _gpqa_zeroshot_yaml doc_to_text, choices "(A)".."(D)". lm-eval shuffles with the
        # global RNG; here the order depends only on (seed, question).
        question = str_field(record, "Question", fmt)
        keys = [f"Incorrect Answer {i}" for i in (1, 2, 3)] + ["Correct Answer"]
        for k in keys:
            value = field(record, k, fmt)
            if value is not None and not isinstance(value, str):
                raise bad_field(k, fmt, "a string", value)
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
