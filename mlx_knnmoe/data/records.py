"""Local dataset files (jsonl, json, csv, txt, parquet) to records, each with its file:line."""

from __future__ import annotations

import csv
import itertools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

EXTENSIONS = (".jsonl", ".json", ".csv", ".txt", ".parquet")
MAX_LINE_CHARS = 1 << 20  # a longer line is refused: one record should not fill the memory


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message says where and why."""


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``(source, record)`` for each record of a local file, in file order. Line-based
    files (jsonl, csv, txt) are streamed, so a consumer that stops early stops reading; a line
    longer than ``MAX_LINE_CHARS`` is refused by file and line."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; supported: {', '.join(EXTENSIONS)}"
        )
    check_regular_file(path)
    if ext == ".parquet":
        yield from _parquet_records(path)
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = _lines(path, f)
        if ext == ".jsonl":
            items = _jsonl_records(path, lines)
        elif ext == ".json":
            items = _json_records(path, _whole(path, f))  # one document: read whole
        elif ext == ".csv":
            items = _csv_records(path, lines)
        else:
            items = _txt_records(path, lines)
        for source, record in items:
            if not isinstance(record, dict):
                raise DataError(f"{source}: expected an object, found {type(record).__name__}")
            yield source, record


def check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file (a FIFO or a device would block or never end)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise DataError(f"{path}: expected a regular file, found {kind}")


def _lines(path: Path, f) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline), each checked against the length limit."""
    number = 0
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number + 1}: not UTF-8 text ({e})") from None
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(
                f"{path}:{number}: line longer than {MAX_LINE_CHARS} characters (the limit); "
                "split the record or use another format"
            )
        yield number, line


def _whole(path: Path, f) -> str:
    try:
        return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl_records(path: Path, lines):
    for i, line in lines:
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


def _csv_records(path: Path, lines):
    reader = csv.DictReader(line for _, line in lines)
    for i, row in enumerate(reader):
        source = f"{path}:{i + 2}"  # 1-based line of the row, counting the header
        if None in row:
            raise DataError(f"{source}: row has more fields than the header")
        yield source, row


def _txt_records(path: Path, lines):
    """Documents separated by one or more blank lines; source is the document's first line."""
    doc: list[str] = []
    start = 0
    for i, line in itertools.chain(lines, [(0, "")]):
        line = line.rstrip("\r\n")
        if line.strip():
            start = start or i
            doc.append(line)
        elif doc:
            yield f"{path}:{start}", {"text": "\n".join(doc)}
            doc, start = [], 0


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
