"""Fixtures shared across the test folders: tiny random models (in memory and as mlx-lm
directories) and a memory that forces one expert. Directories are built once per session;
in-memory models once per module, since tests attach memories to them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from tests.helpers import force_expert, memory_from
from tests.tiny_models import make_tiny_model_dir, tiny_model

FORCED_EXPERT = 4
MEMORY_PROMPT = "The patient presents with fever and cough."


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny qwen3_moe model directory that mlx_lm.load reads."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "qwen3-moe-tiny", "qwen3_moe")


@pytest.fixture(scope="session")
def base_model_dir(qwen_dir, tmp_path_factory) -> Path:
    """The qwen directory with the chat template removed, as most base checkpoints ship."""
    out = tmp_path_factory.mktemp("tiny") / "qwen3-moe-base"
    shutil.copytree(qwen_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory) -> Path:
    """A tiny olmoe model directory that mlx_lm.load reads."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "olmoe-tiny", "olmoe")


@pytest.fixture(scope="module")
def olmoe_loaded(olmoe_dir):
    """(model, tokenizer) of the olmoe directory."""
    from mlx_lm import load

    return load(str(olmoe_dir))


@pytest.fixture(scope="module")
def olmoe():
    """A tiny random olmoe model, without a tokenizer."""
    return tiny_model("olmoe")


@pytest.fixture(scope="session")
def forcing_memory(qwen_dir, tmp_path_factory) -> Path:
    """A memory of the qwen directory keyed on MEMORY_PROMPT whose values force expert 4."""
    from mlx_lm import load

    model, tok = load(str(qwen_dir))
    toks = mx.array([tok.encode(MEMORY_PROMPT)])
    memory = memory_from(model, toks, force_expert(FORCED_EXPERT))
    return memory.save(tmp_path_factory.mktemp("memory") / "med.st")
