"""lm-evaluation-harness through mlx_knnmoe.evaluate --tasks, offline: a task YAML reading the
bundled multiple-choice split from its local file gives the same accuracy as our own scorer
on the same items, for the plain model and with a memory."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR
from mlx_knnmoe.commands.evaluate import cli
from mlx_knnmoe.evaluation.compare import load_items
from mlx_knnmoe.evaluation.scoring import score_choices
from mlx_knnmoe.retrieval.attach import attach, detach
from tests.helpers import REPO, force_expert, memory_from

pytest.importorskip("lm_eval")

LIMIT = 24
DATA = DATA_DIR / "orig_test_mc.jsonl"


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    return load(str(MODEL_DIR))


@pytest.fixture(scope="module")
def memory_path(loaded, tmp_path_factory) -> Path:
    """A memory keyed on the first test questions whose values force expert 3."""
    model, tok = loaded
    items = load_items(DATA, "auto", 0, 4)[1]
    keys = mx.array([tok.encode("".join(it.prompt for it in items))])
    return memory_from(model, keys, force_expert(3)).save(tmp_path_factory.mktemp("m") / "f.st")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The example task YAML with its data path made absolute (the tests may run anywhere)."""
    text = (REPO / "examples" / "lm_eval" / "bundled_mc.yaml").read_text()
    relative = "mlx_knnmoe/bundled/data/orig_test_mc.jsonl"
    assert relative in text
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "bundled_mc.yaml").write_text(text.replace(relative, str(DATA)))
    return folder


def our_accuracy(loaded, memory=None) -> float:
    model, tok = loaded
    items = load_items(DATA, "auto", 0, LIMIT)[1]
    if memory is not None:
        attach(model, memory)
    try:
        return float(np.mean(score_choices(model, tok, items).acc))
    finally:
        detach(model)


def test_lm_eval_task_matches_our_scorer(loaded, memory_path, task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # not the user's cache
    out = tmp_path / "res.json"
    args = ["--model", str(MODEL_DIR), "--tasks", "bundled_mc", "--include-path", str(task_dir)]
    args += ["--memory", f"forced={memory_path}", "--limit", str(LIMIT), "--no-apply-chat-template"]
    result = CliRunner().invoke(cli, [*args, "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (
        "plain:" in result.stdout
        and "forced:" in result.stdout
        and "side by side:" in result.stdout
    )
    side = result.stdout.split("side by side:")[1].splitlines()
    assert side[1].split() == ["task", "metric", "plain", "forced"]
    doc = json.loads(out.read_text())
    plain, with_memory = (
        doc["variants"]["plain"]["bundled_mc"],
        doc["variants"]["forced"]["bundled_mc"],
    )
    assert plain["acc,none"] == pytest.approx(our_accuracy(loaded), abs=1e-9)
    assert with_memory["acc,none"] == pytest.approx(our_accuracy(loaded, memory_path), abs=1e-9)
    assert with_memory["acc,none"] != plain["acc,none"]  # the memory was really in use


def test_tasks_or_data_not_both(tmp_path):
    args = ["--model", str(MODEL_DIR), "--tasks", "x", "--data", str(DATA)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "give either --data" in result.output
