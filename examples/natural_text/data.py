"""The natural-text benchmark's data: text already on the machine, split by file.

    python examples/natural_text/data.py --out examples/natural_text/data

Original domain: the Python standard library's own sources (``/usr/lib/python3.X``, without
site-packages). Shifted domain: C header files (``/usr/include``). Files are sorted, shuffled
with ``--seed`` and split by file, so no file contributes to two splits:
- ``train.txt``: the training text, every original training file plus a few shifted files
  (``--shift-train-files``), so the model has seen a little C;
- ``shifted_reference.jsonl``, ``shifted_heldout.jsonl``, ``shifted_test.jsonl``: chunks of
  disjoint sets of C headers (memory, choosing settings, scoring);
- ``original_heldout.jsonl``, ``original_test.jsonl``: chunks of Python files unseen in
  training.
A chunk is whole lines of one file, about ``--chunk-chars`` characters, at most
``--chunks-per-file`` per file (spread over the file). ``manifest.json`` lists every file of
every split with its sha256, so a rerun on another machine says what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

SPLIT_CHUNKS = {  # split -> chunks: sized so a full run takes ~10 min on 2 shared CPU cores
    "shifted_reference": 160,
    "shifted_heldout": 40,
    "shifted_test": 60,
    "original_heldout": 40,
    "original_test": 60,
}


def python_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def c_headers(root: Path = Path("/usr/include")) -> list[Path]:
    return sorted(p for p in root.rglob("*.h") if p.is_file())


def read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def chunks_of(text: str, chunk_chars: int, per_file: int, rng: random.Random) -> list[str]:
    """Up to ``per_file`` chunks of whole lines, each about ``chunk_chars`` characters, taken
    from evenly spaced starts; chunks of blank lines only are dropped."""
    lines = text.splitlines(keepends=True)
    pieces, current = [], ""
    for line in lines:
        if current and len(current) + len(line) > chunk_chars:
            pieces.append(current)
            current = ""
        current += line[: 2 * chunk_chars]
    if current:
        pieces.append(current)
    pieces = [p for p in pieces if len(p.strip()) >= chunk_chars // 4]
    if len(pieces) <= per_file:
        return pieces
    step = len(pieces) / per_file
    offset = rng.random() * step
    return [pieces[int(offset + i * step)] for i in range(per_file)]


def split_chunks(files: list[Path], wanted: int, args, rng: random.Random) -> tuple[list, list]:
    """Chunks from ``files`` in order until ``wanted``; the files used."""
    out, used = [], []
    for path in files:
        if len(out) >= wanted:
            break
        text = read_text(path)
        if text is None:
            continue
        got = chunks_of(text, args.chunk_chars, args.chunks_per_file, rng)
        if got:
            out += got[: wanted - len(out)]
            used.append(path)
    if len(out) < wanted:
        raise SystemExit(f"only {len(out)} chunks for a split that needs {wanted}")
    return out, used


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, chunks: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for c in chunks:
            f.write(json.dumps({"text": c}) + "\n")
    tmp.replace(path)


def make(args) -> dict:
    rng = random.Random(args.seed)
    py, c = python_sources(), c_headers(Path(args.include))
    rng.shuffle(py)
    rng.shuffle(c)
    sizes = {k: max(1, round(v * args.scale)) for k, v in SPLIT_CHUNKS.items()}
    splits, files = {}, {}
    rest = c
    for name in ("shifted_test", "shifted_heldout", "shifted_reference"):
        splits[name], files[name] = split_chunks(rest, sizes[name], args, rng)
        rest = rest[rest.index(files[name][-1]) + 1 :]
    shift_train = [p for p in rest if read_text(p)][: args.shift_train_files]
    rest = py
    for name in ("original_test", "original_heldout"):
        splits[name], files[name] = split_chunks(rest, sizes[name], args, rng)
        rest = rest[rest.index(files[name][-1]) + 1 :]
    train = [p for p in rest if read_text(p)][: args.max_train_files] + shift_train
    files["train"] = train
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, chunks in splits.items():
        write_jsonl(out / f"{name}.jsonl", chunks)
    texts = [read_text(p) for p in train]
    rng.shuffle(texts)
    (out / "train.txt").write_text("\n\n".join(texts))
    manifest = {
        "seed": args.seed,
        "python": sys.version.split()[0],
        "chunks": {k: len(v) for k, v in splits.items()},
        "train_chars": sum(len(t) for t in texts),
        "shift_train_files": len(shift_train),
        "files": {k: [[str(p), sha(p)] for p in v] for k, v in files.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include", default="/usr/include")
    ap.add_argument("--chunk-chars", type=int, default=160)
    ap.add_argument("--chunks-per-file", type=int, default=2)
    ap.add_argument("--shift-train-files", type=int, default=40)
    ap.add_argument("--max-train-files", type=int, default=10_000)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every split's size")
    return ap.parse_args(argv)


if __name__ == "__main__":
    m = make(parse_args())
    print(json.dumps({k: m[k] for k in ("chunks", "train_chars", "shift_train_files")}))
