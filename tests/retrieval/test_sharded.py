"""Tensor- and pipeline-parallel inference through mlx-lm's sharded_load with a memory
attached (router and memory replicated on each rank) gives the single-process logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, attach
from tests.helpers import force_expert, memory_from
from tests.tiny_models import make_tiny_model_dir

SCRIPT = Path(__file__).parent / "scripts" / "sharded_generate.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mlx_lm import load

    root = tmp_path_factory.mktemp("sharded")
    model_dir = make_tiny_model_dir(root / "model", "qwen3_moe")
    weights = mx.load(str(model_dir / "model.safetensors"))  # sharded_load reads the index
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in weights}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    model, tok = load(str(model_dir))
    toks = mx.array([tok.encode("The patient presents with fever and cough.")])
    memory = memory_from(model, toks, force_expert(3)).save(root / "m.st")
    attach(model, memory, KNNConfig(mix="union", lambda_scale=0.7))
    return root, model_dir, memory, np.array(model(toks))


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_sharded_inference_with_a_memory(setup, mode):
    root, model_dir, memory, expected = setup
    out = root / f"{mode}.npy"
    launcher = str(Path(sys.executable).with_name("mlx.launch"))
    cmd = [launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2"]
    cmd += ["--python", sys.executable, str(SCRIPT), str(model_dir), str(memory), mode, str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # mlx.launch exits 0 even when ranks fail: check each rank's own report
    assert "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout, run.stdout + run.stderr
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-4, atol=1e-4)
