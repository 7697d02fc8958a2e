"""generate end to end on a tiny local model directory, offline; load(..., memory=...)."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import Memory, load, resolve_memory
from mlx_knnmoe.commands.generate import cli as generate_cli
from tests.helpers import REPO


def run_generate(*args):
    result = CliRunner().invoke(generate_cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_generate_with_memory_and_stats(qwen_dir, forcing_memory):
    args = ["--model", str(qwen_dir), "--prompt", "The patient presents with", "-m", "12"]
    plain = run_generate(*args, "--quiet")
    with_mem = run_generate(
        *args, "--memory", str(forcing_memory), "--knn-stats", "--mix", "union", "--knn-k", "2"
    )
    assert "mean lambda" in with_mem.output and "experts changed" in with_mem.output
    rows = [line.split() for line in with_mem.output.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2] and all(float(r[2]) > 0 for r in rows)
    assert "kNN-MoE: k=2 rbf mix=union" in with_mem.stderr
    off = run_generate(*args, "--quiet", "--memory", str(forcing_memory), "--lambda-scale", "0")
    assert off.output == plain.output  # lambda 0: the same greedy text


def test_generate_errors_are_clear(qwen_dir, tmp_path):
    result = CliRunner().invoke(
        generate_cli, ["--model", str(qwen_dir), "--memory", str(tmp_path / "nope.st")]
    )
    assert result.exit_code == 1 and "nope.st does not exist" in result.output  # no traceback
    assert isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(generate_cli, ["--model", str(qwen_dir), "--knn-stats"])
    assert result.exit_code == 2 and "--knn-stats needs --memory" in result.output
    result = CliRunner().invoke(generate_cli, ["--model", str(qwen_dir), "--mix", "blend"])
    assert result.exit_code == 2 and "'blend' is not one of" in result.output


def test_console_script_runs_offline(qwen_dir, forcing_memory):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_knnmoe",
            "generate",
            "--model",
            str(qwen_dir),
            "--memory",
            str(forcing_memory),
            "-p",
            "Question:",
            "-m",
            "5",
            "--knn-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Generation: 5 tokens" in out.stderr and "mean lambda" in out.stdout


def test_python_load_attaches_memory(qwen_dir, forcing_memory):
    model, tok = load(str(qwen_dir), memory=str(forcing_memory))
    plain, _ = load(str(qwen_dir))
    toks = mx.array([tok.encode("The patient presents with fever and cough.")])
    assert not np.allclose(np.array(model(toks)), np.array(plain(toks)))


def test_packaged_memory_is_found_by_name(qwen_dir, forcing_memory, tmp_path):
    (qwen_dir / "memories").mkdir(exist_ok=True)
    Memory.load(forcing_memory).save(qwen_dir / "memories" / "med.st", force=True)
    assert resolve_memory("med", qwen_dir) == qwen_dir / "memories" / "med.st"
    model, _ = load(str(qwen_dir), memory="med")
    assert model.layers[1].mlp.gate.memory is not None
    with pytest.raises(FileNotFoundError, match="memory 'other' not found"):
        resolve_memory("other", qwen_dir)


def test_example_runs():
    root = str(REPO)
    out = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "attach_memory.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "kNN-MoE:" in out.stdout and "mean lambda" in out.stdout


def test_public_functions_are_not_shadowed_by_submodules():
    import importlib
    import pkgutil

    import mlx_knnmoe

    for info in pkgutil.walk_packages(mlx_knnmoe.__path__, "mlx_knnmoe."):
        if ".pytorch" in info.name or info.name.endswith(("rank_main", "__main__")):
            continue  # needs torch / runs a command when imported
        importlib.import_module(info.name)  # importing sets package attributes
    for name in mlx_knnmoe.__all__:
        assert not isinstance(getattr(mlx_knnmoe, name), type(mlx_knnmoe)), name
    assert callable(mlx_knnmoe.build_memory) and callable(mlx_knnmoe.load)


def test_packaged_names_cannot_leave_the_memories_folder(qwen_dir, forcing_memory, tmp_path):
    memories = qwen_dir / "memories"
    memories.mkdir(exist_ok=True)
    (qwen_dir / "outside.st").write_bytes(forcing_memory.read_bytes())
    for spec in ("../outside", str(memories / ".." / "outside"), "sub/../../outside"):
        with pytest.raises(FileNotFoundError, match="read as a path, not as a memory packaged"):
            resolve_memory(spec, qwen_dir)
    with pytest.raises(FileNotFoundError, match="not a packaged memory name"):
        resolve_memory(".outside", qwen_dir)
    (memories / "link.st").unlink(missing_ok=True)
    (memories / "link.st").symlink_to(qwen_dir / "outside.st")
    with pytest.raises(FileNotFoundError, match="link.st links outside"):
        resolve_memory("link", qwen_dir)
    (memories / "link.st").unlink()
    assert resolve_memory(str(qwen_dir / "outside.st"), qwen_dir) == qwen_dir / "outside.st"
    result = CliRunner().invoke(
        generate_cli, ["--model", str(qwen_dir), "--memory", "../outside", "-m", "1"]
    )
    assert result.exit_code == 1 and "is read as a path" in result.stderr
