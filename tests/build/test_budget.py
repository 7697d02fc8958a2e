"""Size budgets: parsing, the format ladder, condensing near-duplicates with the same experts,
and ``build_memory --budget`` writing a memory that fits, with its size printed."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import Memory
from mlx_knnmoe.build.budget import (
    _ladder,
    budget_bytes,
    condense,
    fit_budget,
    model_weight_bytes,
    parse_budget,
)
from mlx_knnmoe.commands.build_memory import cli as build_cli
from mlx_knnmoe.memory.compress import compress
from tests.helpers import memory_from, tokens


def test_auto_budget_is_a_tenth_of_large_models_only(olmoe, monkeypatch):
    from mlx_knnmoe.build import budget

    assert budget_bytes("auto", olmoe) is None  # a small model keeps its memory as built
    assert budget_bytes("off", olmoe) is None
    assert budget_bytes("40%", olmoe) == int(0.4 * model_weight_bytes(olmoe))
    monkeypatch.setattr(budget, "model_weight_bytes", lambda model: 3_890_000_000)
    assert budget_bytes("auto", olmoe) == 389_000_000
    assert budget_bytes("off", olmoe) is None


def test_parse_budget():
    assert parse_budget("10%") == ("share", 0.1)
    assert parse_budget(" Auto") == ("auto", 0.1) and parse_budget("off") == ("off", 0.0)
    assert parse_budget("400MB") == ("bytes", 4e8)
    assert parse_budget("1.5 GiB") == ("bytes", 1.5 * 2**30)
    for bad in ("ten", "-3%", "0MB", "5 parsecs"):
        with pytest.raises(ValueError, match="budget must look like"):
            parse_budget(bad)


@pytest.fixture(scope="module")
def memory(olmoe):
    return memory_from(olmoe, tokens(0, (8, 64)))


def test_ladder_picks_the_first_format_that_fits(olmoe, memory):
    full = memory.nbytes()
    int8 = fit_budget(memory, int(full * 0.45), olmoe, log=lambda m: None)
    assert int8.nbytes() <= full * 0.45 and int8.compression["keys"] == "int8"
    assert "pca" not in int8.compression  # int8 alone fits: no projection
    tight = fit_budget(memory, int(full * 0.2), olmoe, log=lambda m: None)
    assert tight.nbytes() <= full * 0.2 and tight.compression["pca"]["dim"] < 64


def test_condense_merges_only_same_expert_duplicates(olmoe, memory):
    twice = Memory(
        {i: mx.concatenate([k, k + 1e-3]) for i, k in memory.keys.items()},
        {i: mx.concatenate([v, v]) for i, v in memory.logits.items()},
        memory.fingerprint,
    )
    once = condense(twice, olmoe)
    for layer in memory.layers:
        n = memory.keys[layer].shape[0]
        assert n <= once.num_entries()[layer] < 2 * n * 0.6  # most copies merged
    # copies whose logits select other experts are never merged (a few other pairs may be)
    flipped = Memory(
        twice.keys,
        {i: mx.concatenate([v, -v]) for i, v in memory.logits.items()},
        memory.fingerprint,
    )
    kept = condense(flipped, olmoe).num_entries()
    assert all(kept[i] > 0.95 * flipped.num_entries()[i] for i in memory.layers)


def test_build_with_budget_fits_and_prints_its_size(olmoe_dir, olmoe_loaded, tmp_path):
    data = tmp_path / "t.jsonl"
    text = "the patient has a fever and a cough; the answer is A. " * 3
    data.write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(6)))
    out = tmp_path / "b.st"
    args = ["--model", str(olmoe_dir), "--data", str(data), "--out", str(out), "--eta", "1"]
    result = CliRunner().invoke(build_cli, args + ["--budget", "40%", "--quiet"])
    assert result.exit_code == 0, result.output
    weights = model_weight_bytes(olmoe_loaded[0])
    memory = Memory.load(out)
    assert memory.nbytes() <= 0.4 * weights
    assert memory.compression["budget"] == int(0.4 * weights)
    assert f"of the model's {weights / 1e6:.1f} MB of weights" in result.output
    bad = CliRunner().invoke(build_cli, args + ["--force", "--budget", "lots"])
    assert bad.exit_code != 0 and "budget must look like 10%, 400MB, auto or off" in bad.output
    assert np.isfinite(memory.bandwidth[memory.layers[0]])


def test_ladder_keeps_top_experts_before_touching_keys(olmoe, memory):
    """Step two keeps the values of the top 2k experts only (no measurable price on the
    bundled benchmark) with the keys as built; the last step keeps k."""
    top = compress(memory, values="float16", top_experts=4)  # tiny olmoe: N = 8, k = 2
    picked = fit_budget(memory, top.nbytes(), olmoe, log=lambda m: None)
    assert picked.compression["top_experts"] == 4 and "keys" not in picked.compression
    steps = _ladder(memory)
    assert steps[-1]["top_experts"] == 2 and steps[-1]["pca"] == 8  # d/8: the last >= 8 dims
    assert all(s.get("top_experts") in (None, 4) for s in steps[:-1])


def test_condense_keeps_top_expert_values(olmoe, memory):
    twice = Memory(
        {i: mx.concatenate([k, k + 1e-3]) for i, k in memory.keys.items()},
        {i: mx.concatenate([v, v]) for i, v in memory.logits.items()},
        memory.fingerprint,
    )
    once = condense(compress(twice, top_experts=4), olmoe)
    for layer in memory.layers:
        n = once.num_entries()[layer]
        assert n < 2 * memory.keys[layer].shape[0] * 0.6
        assert once.logits[layer].shape == once.top_experts[layer].shape == (n, 4)
        assert once.rest_logits[layer].shape == (n,)


def test_build_stores_float16_values_unless_asked(olmoe_dir, tmp_path):
    data = tmp_path / "t.jsonl"
    text = "the patient has a fever and a cough; the answer is A. " * 3
    data.write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(4)))
    args = ["--model", str(olmoe_dir), "--data", str(data), "--eta", "1", "--quiet"]
    for flag, dtype in (([], mx.float16), (["--values", "float32"], mx.float32)):
        out = tmp_path / f"{dtype}.st"
        result = CliRunner().invoke(build_cli, args + ["--out", str(out)] + flag)
        assert result.exit_code == 0, result.output
        memory = Memory.load(out)
        assert all(memory.logits[i].dtype == dtype for i in memory.layers)
        assert all(memory.keys[i].dtype == mx.float32 for i in memory.layers)  # the model's
