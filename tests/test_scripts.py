"""Every console script also runs as ``python -m mlx_knnmoe.<name>``, and such a module never
shadows the package's own attributes (``mlx_knnmoe.build_memory`` is the API's function)."""

import re
import runpy
import subprocess
import sys

import pytest

import mlx_knnmoe
from mlx_knnmoe.scripts import COMMANDS
from tests.helpers import REPO


def console_scripts() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([^"]+)"', section, flags=re.M))


def test_every_command_has_its_console_script():
    scripts = console_scripts()
    assert scripts.pop("mlx_knnmoe") == "mlx_knnmoe.commands.main:main"
    assert scripts == {f"mlx_knnmoe.{c}": f"mlx_knnmoe.commands.{c}:main" for c in COMMANDS}


@pytest.mark.parametrize("name", COMMANDS)
def test_python_dash_m_runs_each_command(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["-m", "-h"])  # as the interpreter sets it for -m
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"mlx_knnmoe.{name}", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"Usage: python -m mlx_knnmoe.{name} [OPTIONS]")


def test_python_dash_m_in_a_real_interpreter():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_knnmoe.build_memory", "-h"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: python -m mlx_knnmoe.build_memory [OPTIONS]")


def test_a_plain_import_finds_no_command_module():
    with pytest.raises(ModuleNotFoundError):
        __import__("mlx_knnmoe.build_memory")
    assert callable(mlx_knnmoe.build_memory) and mlx_knnmoe.build_memory.__module__.endswith(
        "pipeline"
    )
