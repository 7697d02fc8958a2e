"""Datasets are streamed: --max-examples stops reading, an overlong line is refused by file and
line, a FIFO or a device is refused instead of read."""

import json
import os

import pytest
from click.testing import CliRunner
from mlx_lm.utils import load_tokenizer

from mlx_knnmoe.commands.build_memory import cli
from mlx_knnmoe.data.examples import load_dataset
from mlx_knnmoe.data.records import MAX_LINE_CHARS, DataError, read_records
from mlx_knnmoe.evaluation.compare import load_items


@pytest.fixture(scope="module")
def tok(olmoe_dir):
    return load_tokenizer(olmoe_dir)


def lines_then(tmp_path, n: int, tail: str, name="d.jsonl"):
    path = tmp_path / name
    good = "".join(json.dumps({"prompt": f"Q{i}:", "completion": f" {i}"}) + "\n" for i in range(n))
    path.write_text(good + tail)
    return path


def test_an_overlong_line_is_refused_by_file_and_line(tmp_path, tok):
    path = lines_then(tmp_path, 2, json.dumps({"text": "x" * (MAX_LINE_CHARS + 10)}) + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:3: line longer than {MAX_LINE_CHARS} char"):
        load_dataset(path, tok)
    txt = tmp_path / "d.txt"
    txt.write_text("a doc\n\n" + "y" * (MAX_LINE_CHARS + 1))
    with pytest.raises(DataError, match=r"d.txt:3: line longer than"):
        list(read_records(txt))


def test_max_examples_stops_reading(tmp_path, tok):
    # past the fifth record the file is broken: reading it would fail
    path = lines_then(tmp_path, 5, "{not json\n" + "z" * (MAX_LINE_CHARS + 5))
    ds = load_dataset(path, tok, max_examples=5)
    assert sorted(e.source for e in ds.examples) == [f"{path}:{i}" for i in range(1, 6)]
    with pytest.raises(DataError, match=r"d.jsonl:6: invalid JSON"):
        load_dataset(path, tok, max_examples=6)
    mc = tmp_path / "mc.jsonl"
    record = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 0}
    mc.write_text((json.dumps(record) + "\n") * 3 + "{broken\n")
    fmt, items = load_items(mc, "auto", 0, 3)
    assert len(items) == 3


@pytest.mark.parametrize("bad", [-3, 0, 2.5])
def test_max_examples_is_checked(tmp_path, tok, bad):
    with pytest.raises(ValueError, match="max_examples must be an integer >= 1"):
        load_dataset(lines_then(tmp_path, 3, ""), tok, max_examples=bad)


def test_a_fifo_or_device_is_refused(tmp_path, olmoe_dir):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe.jsonl: expected a regular file, found a FIFO"):
        list(read_records(fifo))
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    with pytest.raises(DataError, match=r"zero.txt: expected a regular file, found a device"):
        list(read_records(tmp_path / "zero.txt"))
    args = ["--model", str(olmoe_dir), "--data", str(fifo), "--out", str(tmp_path / "o.st")]
    result = CliRunner().invoke(cli, [*args, "--eta", "1"])
    assert result.exit_code == 1 and "found a FIFO" in result.stderr, result.output
