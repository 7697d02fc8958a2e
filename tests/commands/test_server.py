"""The mlx_knnmoe.server command: serves until stopped (Ctrl-C or SIGTERM); bad flags are
one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from click.testing import CliRunner

from mlx_knnmoe.commands.server import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_and_stops_on_sigterm(qwen_dir, forcing_memory):
    port = free_port()
    argv = [sys.executable, "-m", "mlx_knnmoe.server", "--model", str(qwen_dir)]
    argv += ["--memory", f"med={forcing_memory}", "--port", str(port), "--max-tokens", "3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
        assert f"at http://127.0.0.1:{port}/v1 with memories: none, med (default med)" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            listed = json.loads(r.read())["data"][0]
        assert listed["id"] == str(qwen_dir) and listed["memories"][0]["name"] == "med"
        body = json.dumps({"prompt": "The patient", "memory": "none"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body)
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGTERM)  # Ctrl-C (SIGINT) takes the same path
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_bad_flags_are_one_line_errors(qwen_dir, forcing_memory, tmp_path):
    cases = {
        "memory 'nope' not found": ["--memory", "nope"],
        "default memory 'law' is not one of none, med": [
            "--memory",
            f"med={forcing_memory}",
            "--default-memory",
            "law",
        ],
        "two memories are named 'med'": ["--memory", f"med={forcing_memory}"] * 2,
    }
    for message, flags in cases.items():
        result = CliRunner().invoke(cli, ["--model", str(qwen_dir), *flags])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_a_memory_of_another_model_stops_the_start(olmoe_dir, forcing_memory):
    """Checked against the model once it is loaded (in mlx-lm's generation thread)."""
    result = CliRunner().invoke(cli, ["--model", str(olmoe_dir), "--memory", str(forcing_memory)])
    assert result.exit_code == 1 and "Error: " in result.output, result.output
    assert "qwen3_moe" in result.output and "Traceback" not in result.output
