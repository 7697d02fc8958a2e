"""Local dataset files (jsonl, json, csv, txt, parquet) to records, each with its file:line."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

EXTENSIONS = (".jsonl", ".json", ".csv", ".txt", ".parquet")


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message says where and why."""


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
