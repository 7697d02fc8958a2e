"""A small byte-level BPE tokenizer for the bundled model, built by rule (no training).

Vocabulary: 3 special tokens, the 256 byte symbols, then merges that make every word of
the task data one token: " a".." z" and " A".." Z" (a space and a letter), each cue word of
both registers, "Answer" and " ->". Any other text still encodes, byte by byte. Written as a
``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast`` (and so mlx-lm) reads.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The model is not trained on conversations: a chat turn is the last user message, as is.
CHAT_TEMPLATE = (
    "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | list"
    " | last }}"
)


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256 up)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _word_symbols(word: str, symbols: list[str]) -> list[str]:
    return [symbols[b] for b in word.encode("utf-8")]


def build_tokenizer_json(words: list[str]) -> dict:
    symbols = byte_symbols()
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for s in symbols:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:  # left-to-right chain: ((a b) c) d ...
        parts = _word_symbols(word, symbols)
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, s in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }


def task_words(cue_words: list[str]) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return (
        [" " + c for c in letters]
        + [" " + c.upper() for c in letters]
        + list(cue_words)
        + ["Answer", " ->"]
    )


def save_tokenizer(path: str | Path, cue_words: list[str]) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``path``; returns the vocab size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = build_tokenizer_json(task_words(cue_words))
    (path / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIALS[0],
        "pad_token": SPECIALS[0],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 128,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return len(doc["model"]["vocab"])
