"""Data-parallel builds under mlx.launch (ring backend on 127.0.0.1)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_knnmoe import Memory
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model_dir(root / "model", "olmoe")
    data = root / "d.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, data


def build(model, data, out, *extra, env=None):
    cmd = [sys.executable, "-m", "mlx_knnmoe", "build_memory", "--model", str(model)]
    cmd += ["--data", str(data), "--out", str(out), "--batch-tokens", "64", "--quiet"]
    cmd += ["--eta-grid", "1,3", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_ranks_build_the_same_memory_as_one(setup):
    root, model, data = setup
    one = build(model, data, root / "one.st")
    assert one.returncode == 0, one.stderr
    two = build(model, data, root / "two.st", "--ranks", "2")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = Memory.load(root / "one.st"), Memory.load(root / "two.st")
    assert a.layers == b.layers and a.bandwidth == b.bandwidth
    for layer in a.layers:
        np.testing.assert_array_equal(np.array(a.keys[layer]), np.array(b.keys[layer]))
        np.testing.assert_array_equal(np.array(a.logits[layer]), np.array(b.logits[layer]))
    same = ("eta", "eta_auto", "datasets", "entries", "nll_before")
    assert {k: a.build[k] for k in same} == {k: b.build[k] for k in same}


def test_a_failing_rank_fails_the_command_with_its_error(setup):
    root, model, data = setup
    result = build(model, data, root / "bad.st", "--ranks", "2", env={"MLX_KNNMOE_FAIL_RANK": "1"})
    assert result.returncode != 0
    assert "rank 1: RuntimeError: fault injected on rank 1" in result.stderr
    assert not (root / "bad.st").exists()
