"""Every numeric flag is range-checked before any work: a bad value is a one-line usage error
(exit status 2) naming the flag."""

import importlib

import click
import pytest
from click.testing import CliRunner

# (command, flag, a bad value, what the message says)
BAD_FLAGS = [
    ("build_memory", "--eta", "nan", "eta must be finite and > 0"),
    ("build_memory", "--eta", "inf", "eta must be finite and > 0"),
    ("build_memory", "--eta", "-1", "eta must be finite and > 0"),
    ("build_memory", "--eta-grid", "nan,1", "every eta must be finite and > 0"),
    ("build_memory", "--eta-grid", "1,0", "every eta must be finite and > 0"),
    ("build_memory", "--eta-patience", "-1", "not in the range x>=0"),
    ("build_memory", "--steps", "0", "not in the range x>=1"),
    ("build_memory", "--dense-surrogate", "0.5", "expected a number, auto or off"),
    ("build_memory", "--max-examples", "-3", "not in the range x>=1"),
    ("build_memory", "--max-seq-len", "1", "not in the range x>=2"),
    ("build_memory", "--batch-tokens", "0", "not in the range x>=1"),
    ("build_memory", "--heldout", "1.5", "not in the range 0.0<x<1.0"),
    ("build_memory", "--heldout", "0", "not in the range 0.0<x<1.0"),
    ("build_memory", "--heldout", "nan", "is not a finite number"),
    ("build_memory", "--max-heldout", "0", "not in the range x>=1"),
    ("build_memory", "--ranks", "0", "not in the range x>=1"),
    ("build_memory", "--knn-k", "0", "not in the range x>=1"),
    ("build_memory", "--lambda-scale", "-0.5", "not in the range x>=0"),
    ("generate", "--knn-k", "0", "not in the range x>=1"),
    ("generate", "--lambda-scale", "nan", "is not a finite number"),
    ("generate", "--lambda-scale", "-1", "not in the range x>=0"),
    ("generate", "--bandwidth", "0", "not in the range x>0"),
    ("generate", "--bandwidth", "inf", "is not a finite number"),
    ("generate", "--skip-confident", "entropy:nan", "T a finite number"),
    ("generate", "--max-tokens", "0", "not in the range x>=1"),
    ("generate", "--temp", "-1", "not in the range x>=0"),
    ("generate", "--top-p", "1.5", "not in the range 0.0<=x<=1.0"),
    ("generate", "--min-p", "-0.1", "not in the range 0.0<=x<=1.0"),
    ("generate", "--top-k", "-1", "not in the range x>=0"),
    ("generate", "--max-kv-size", "0", "not in the range x>=1"),
    ("chat", "--max-tokens", "0", "not in the range x>=1"),
    ("chat", "--temp", "nan", "is not a finite number"),
    ("chat", "--max-kv-size", "-5", "not in the range x>=1"),
    ("chat", "--knn-k", "-2", "not in the range x>=1"),
    ("evaluate", "--max-examples", "0", "not in the range x>=1"),
    ("evaluate", "--max-seq-len", "1", "not in the range x>=2"),
    ("evaluate", "--batch-tokens", "0", "not in the range x>=1"),
    ("evaluate", "--bootstrap", "0", "not in the range x>=1"),
    ("evaluate", "--buckets", "0", "not in the range x>=1"),
    ("evaluate", "--bandwidth", "-1", "not in the range x>0"),
    ("compress_memory", "--pca", "0", "not in the range x>=1"),
    ("convert", "--q-bits", "0", "not in the range x>=1"),
    ("convert", "--q-group-size", "-64", "not in the range x>=1"),
    ("benchmark", "--hidden", "0", "not in the range x>=1"),
    ("benchmark", "--layers", "0", "not in the range x>=1"),
    ("benchmark", "--experts", "0", "not in the range x>=1"),
    ("benchmark", "--top-k", "0", "not in the range x>=1"),
    ("benchmark", "--vocab", "0", "not in the range x>=1"),
    ("benchmark", "--prompt-tokens", "0", "not in the range x>=1"),
    ("benchmark", "--gen-tokens", "0", "not in the range x>=1"),
    ("benchmark", "--repeats", "0", "not in the range x>=1"),
    ("benchmark", "--sizes", "100,-5", "expected comma-separated counts >= 1"),
    ("demo", "--ref-examples", "0", "not in the range x>=1"),
    ("demo", "--test-examples", "-1", "not in the range x>=1"),
    ("demo", "--eta", "nan", "eta must be finite and > 0"),
    ("benchmark", "--requests", "0", "not in the range x>=1"),
    ("benchmark", "--concurrency", "0", "not in the range x>=1"),
    ("evaluate", "--num-fewshot", "-1", "not in the range x>=0"),
    ("server", "--port", "70000", "not in the range 0<=x<=65535"),
    ("server", "--max-tokens", "0", "not in the range x>=1"),
    ("server", "--temp", "-1", "not in the range x>=0"),
    ("server", "--top-p", "2", "not in the range 0.0<=x<=1.0"),
    ("server", "--top-k", "-1", "not in the range x>=0"),
    ("server", "--min-p", "-1", "not in the range 0.0<=x<=1.0"),
    ("server", "--decode-concurrency", "0", "not in the range x>=1"),
    ("server", "--prompt-concurrency", "0", "not in the range x>=1"),
    ("server", "--prompt-cache-size", "0", "not in the range x>=1"),
    ("server", "--knn-k", "0", "not in the range x>=1"),
]


def required_args(name: str, tmp_path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    return {
        "build_memory": ["--model", "m", "--data", str(data), "--out", str(tmp_path / "o.st")],
        "evaluate": ["--model", "m", "--data", str(data)],
        "compress_memory": ["missing.st", str(tmp_path / "o.st")],
        "convert": ["--hf-path", "missing"],
    }.get(name, [])


@pytest.mark.parametrize(
    "name, flag, value, message", BAD_FLAGS, ids=[f"{c}{f}={v}" for c, f, v, _ in BAD_FLAGS]
)
def test_bad_flag_is_a_usage_error(name, flag, value, message, tmp_path):
    cli = importlib.import_module(f"mlx_knnmoe.commands.{name}").cli
    result = CliRunner().invoke(cli, [*required_args(name, tmp_path), f"{flag}={value}"])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert message in result.stderr and "Traceback" not in result.output, result.stderr


def test_every_numeric_flag_of_every_command_has_a_range():
    """Only seeds may take any integer; every other number has a checked range."""
    from mlx_knnmoe.scripts import COMMANDS

    unchecked = [
        f"{name} {param.opts[0]}"
        for name in COMMANDS
        for param in importlib.import_module(f"mlx_knnmoe.commands.{name}").cli.params
        if param.type in (click.INT, click.FLOAT) and param.name != "seed"
    ]
    assert not unchecked, unchecked
