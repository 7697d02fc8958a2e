"""Every command turns our own errors and file-system errors into one line on stderr and exit
status 1; --verbose (on the command or the group) shows the traceback instead."""

import importlib

import pytest
from click.testing import CliRunner

from mlx_knnmoe.commands.main import COMMANDS
from mlx_knnmoe.commands.main import main as group
from mlx_knnmoe.commands.options import one_line
from tests.helpers import memory_from, rewritten, tokens


@pytest.fixture(scope="module")
def foreign_memory(olmoe, tmp_path_factory):
    """A valid memory of the olmoe model: it does not fit the qwen directory."""
    return memory_from(olmoe, tokens(0)).save(tmp_path_factory.mktemp("m") / "olmoe.st")


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "corrupt.st"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return path


def cases(qwen, foreign, corrupt, tmp):
    data = tmp / "d.jsonl"
    data.write_text('{"text": "a b c d e f"}\n')
    return {
        "generate": ["--model", qwen, "--memory", foreign, "-m", "2"],
        "chat": ["--model", qwen, "--memory", foreign],
        "evaluate": ["--model", qwen, "--data", str(data), "--memory", foreign],
        "build_memory": ["--model", qwen, "--data", str(data), "--append-to", corrupt],
        "merge": [corrupt, corrupt, "--out", str(tmp / "o.st")],
        "compress_memory": [corrupt, str(tmp / "o.st"), "--keys", "int8"],
        "convert": ["--hf-path", str(tmp / "missing"), "--mlx-path", str(tmp / "out")],
        "benchmark": ["--workdir", corrupt + "/sub", "--quick"],  # under a file
        "demo": ["--model", str(tmp / "missing")],
        "server": ["--model", qwen, "--memory", f"med={foreign}", "--port", "0"],
    }


EXPECTED = {
    "generate": "does not fit this model: ",
    "chat": "does not fit this model: ",
    "evaluate": "does not fit this model: ",
    "build_memory": "corrupt.st: not a readable safetensors file",
    "merge": "corrupt.st: not a readable safetensors file",
    "compress_memory": "corrupt.st: not a readable safetensors file",
    "convert": "missing",
    "benchmark": "Not a directory",
    "demo": "missing",
    "server": "does not fit this model: ",
}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_reports_our_errors_in_one_line(
    name, qwen_dir, foreign_memory, corrupt, tmp_path
):
    cli = importlib.import_module(f"mlx_knnmoe.commands.{name}").cli
    args = cases(str(qwen_dir), str(foreign_memory), str(corrupt), tmp_path)[name]
    result = CliRunner().invoke(cli, args, input="")
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and EXPECTED[name] in errors[0], result.stderr
    verbose = CliRunner().invoke(cli, [*args, "--verbose"], input="")
    assert verbose.exit_code != 0 and not isinstance(verbose.exception, SystemExit), verbose.output


def test_the_group_takes_verbose_too(qwen_dir, foreign_memory):
    args = ["generate", "--model", str(qwen_dir), "--memory", str(foreign_memory)]
    quiet = CliRunner().invoke(group, args)
    assert quiet.exit_code == 1 and "Error: memory " in quiet.stderr
    loud = CliRunner().invoke(group, ["--verbose", *args])
    assert type(loud.exception).__name__ == "MemoryMismatchError"


def test_warnings_are_one_line_each(qwen_dir, forcing_memory, tmp_path):
    old = rewritten(forcing_memory, tmp_path / "old.st", meta={"sha256": None})
    cli = importlib.import_module("mlx_knnmoe.commands.generate").cli
    result = CliRunner().invoke(cli, ["--model", str(qwen_dir), "--memory", str(old), "-m", "1"])
    assert result.exit_code == 0, result.output
    assert "warning: " + str(old) + ": no content hashes" in result.stderr
    notes = [line for line in result.stderr.splitlines() if "content hashes" in line]
    assert len(notes) == 1 and notes[0].startswith("warning: ")


def test_one_line_joins_a_list_of_problems():
    assert one_line(ValueError("m does not fit:\n  a\n  b")) == "m does not fit: a; b"
    assert one_line(KeyError()) == "KeyError"
