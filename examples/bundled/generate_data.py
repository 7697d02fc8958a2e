"""Seeded generator of the bundled demo data: letter-cipher tasks in two "registers".

Every example applies one of eight per-letter maps (tasks) to four space-separated letters:

    next: k q f w -> l r g x          (original register: an English cue word)
    vosk: k q f w -> l r g x          (shifted register: the same task, a made-up cue word)

Each task is a 26-entry lookup table applied letter by letter, the kind of computation that
MoE experts store; the cue word at the start is the only thing that says which table to use.
The shifted register expresses the same eight tasks with other cue words and is rare in
training, so the router of a model trained on this data has seen little of it: its hidden
state carries a cue that the router maps poorly, while the experts that hold each table are
the same in both registers.

Two record formats per split:
  * text (completion): {"prompt": "next: k q f w ->", "completion": " l r g x", ...}
  * mc (MMLU-style): {"question": "next: k q f w", "choices": [4 outputs], "answer": 0-3, ...}
    The wrong choices are the outputs of three other tasks on the same letters, so a model
    that applies the wrong table picks a wrong letter.

Splits per register and format: ``ref`` (a reference set for a memory), ``test``, and
``train`` (a sample of the training distribution for baselines; train.py draws its own seeded
stream, in which the shifted register is 0.06% of the examples). Letter strings of ref and
test are reserved: no training example uses them, and ref and test share none.

    python examples/bundled/generate_data.py --out mlx_knnmoe/bundled/data
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

LETTERS = string.ascii_lowercase
LENGTH = 4  # letters per example
ORIGINAL = ("next", "back", "flip", "half", "pair", "upper", "code", "key")
SHIFTED = ("vosk", "tarn", "miru", "jelo", "bexa", "quon", "dril", "yaph")
REGISTERS = {"orig": ORIGINAL, "shift": SHIFTED}
PERM_SEED = 1234  # fixes the two random-permutation tasks (part of the task definitions)


def _permutation(seed: int) -> list[int]:
    perm = list(range(26))
    rng = random.Random(seed)
    while True:  # a derangement, so no letter maps to itself
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


_CODE, _KEY = _permutation(PERM_SEED), _permutation(PERM_SEED + 1)
TABLES: list[list[str]] = [
    [LETTERS[(i + 1) % 26] for i in range(26)],  # next: a->b
    [LETTERS[(i - 1) % 26] for i in range(26)],  # back: b->a
    [LETTERS[25 - i] for i in range(26)],  # flip: a->z
    [LETTERS[(i + 13) % 26] for i in range(26)],  # half: rot13
    [LETTERS[i ^ 1] for i in range(26)],  # pair: a<->b, c<->d
    [LETTERS[i].upper() for i in range(26)],  # upper: a->A
    [LETTERS[_CODE[i]] for i in range(26)],  # code: a fixed permutation
    [LETTERS[_KEY[i]] for i in range(26)],  # key: another one
]
NUM_TASKS = len(TABLES)


def apply(task: int, letters: str) -> str:
    return " ".join(TABLES[task][LETTERS.index(c)] for c in letters)


def spaced(letters: str) -> str:
    return " ".join(letters)


def text_record(register: str, task: int, letters: str) -> dict:
    cue = REGISTERS[register][task]
    return {
        "prompt": f"{cue}: {spaced(letters)} ->",
        "completion": " " + apply(task, letters),
        "task": ORIGINAL[task],
        "register": register,
    }


def mc_record(register: str, task: int, letters: str, rng: random.Random) -> dict:
    cue = REGISTERS[register][task]
    others = rng.sample([t for t in range(NUM_TASKS) if t != task], 3)
    options = [apply(t, letters) for t in [task, *others]]
    order = list(range(4))
    rng.shuffle(order)
    return {
        "question": f"{cue}: {spaced(letters)}",
        "choices": [options[i] for i in order],
        "answer": order.index(0),
        "task": ORIGINAL[task],
        "register": register,
    }


def reserved_strings(seed: int, n_ref: int, n_test: int) -> dict[str, list[str]]:
    """Letter strings for ref and test (per register and format), disjoint from each other.

    Training draws from the complement (see ``is_reserved``)."""
    rng = random.Random(f"reserve-{seed}")
    need = 2 * 2 * (n_ref + n_test)  # registers x formats x (ref + test)
    chosen: list[str] = []
    seen: set[str] = set()
    while len(chosen) < need:
        s = "".join(rng.choice(LETTERS) for _ in range(LENGTH))
        if s not in seen:
            seen.add(s)
            chosen.append(s)
    out, i = {}, 0
    for register in REGISTERS:
        for fmt in ("text", "mc"):
            for split, n in (("ref", n_ref), ("test", n_test)):
                out[f"{register}_{split}_{fmt}"] = chosen[i : i + n]
                i += n
    return out


def eval_split(register: str, fmt: str, strings: list[str], seed: int, name: str) -> list[dict]:
    """One ref or test split: tasks balanced (cycled, then shuffled), one string each."""
    rng = random.Random(f"{name}-{seed}")
    tasks = [i % NUM_TASKS for i in range(len(strings))]
    rng.shuffle(tasks)
    if fmt == "text":
        return [text_record(register, t, s) for t, s in zip(tasks, strings)]
    return [mc_record(register, t, s, rng) for t, s in zip(tasks, strings)]


def training_stream(seed: int, shift_fraction: float, mc_fraction: float, reserved: set[str]):
    """An endless seeded stream of training records (both formats, both registers)."""
    rng = random.Random(f"train-{seed}")
    while True:
        s = "".join(rng.choice(LETTERS) for _ in range(LENGTH))
        if s in reserved:
            continue
        register = "shift" if rng.random() < shift_fraction else "orig"
        task = rng.randrange(NUM_TASKS)
        if rng.random() < mc_fraction:
            yield mc_record(register, task, s, rng)
        else:
            yield text_record(register, task, s)


def all_reserved(seed: int, n_ref: int, n_test: int) -> set[str]:
    return {s for v in reserved_strings(seed, n_ref, n_test).values() for s in v}


def train_split(register: str, fmt: str, n: int, seed: int, reserved: set[str]) -> list[dict]:
    """A sample of the training distribution of one register and format (tasks uniform,
    letter strings outside ref and test). train.py does not read it: it draws its own stream
    from ``training_stream``. Meant for baselines such as router-only fine-tuning."""
    rng = random.Random(f"{register}_train_{fmt}-{seed}")
    out = []
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(LENGTH))
        if s in reserved:
            continue
        task = rng.randrange(NUM_TASKS)
        out.append(
            text_record(register, task, s) if fmt == "text" else mc_record(register, task, s, rng)
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="mlx_knnmoe/bundled/data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", type=int, default=800, help="reference examples per file")
    ap.add_argument("--test", type=int, default=400, help="test examples per file")
    ap.add_argument(
        "--train", type=int, default=1000, help="train-split examples per file (a sample)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, strings in reserved_strings(args.seed, args.ref, args.test).items():
        register, _, fmt = name.split("_")
        records = eval_split(register, fmt, strings, args.seed, name)
        write_jsonl(out / f"{name}.jsonl", records)
        print(f"{out / (name + '.jsonl')}: {len(records)} records")
    reserved = all_reserved(args.seed, args.ref, args.test)
    for register in REGISTERS:
        for fmt in ("text", "mc"):
            name = f"{register}_train_{fmt}"
            records = train_split(register, fmt, args.train, args.seed, reserved)
            write_jsonl(out / f"{name}.jsonl", records)
            print(f"{out / (name + '.jsonl')}: {len(records)} records")


if __name__ == "__main__":
    main()
