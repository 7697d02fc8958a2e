"""Calibrated confidence: eta and per-layer bandwidth scales chosen on held-out data under a
guard (build/calibrate.py, build/guard.py, build/refine.py)."""

import json

import numpy as np
import pytest

import mlx_knnmoe.build.calibrate as cal
import mlx_knnmoe.build.calibrate_rule as rule
import mlx_knnmoe.build.pipeline as bm
from mlx_knnmoe import BuildConfig, KNNConfig
from mlx_knnmoe.build.guard import sample_guard
from mlx_knnmoe.commands.build_options import summary
from mlx_knnmoe.data.examples import Dataset, Example

EXACT = KNNConfig(search="exact")


def dataset(n=10, length=20, seed=0):
    rng = np.random.default_rng(seed)
    examples = [
        Example(list(rng.integers(0, 60, length)), [0] + [1] * (length - 1), f"d:{i}")
        for i in range(n)
    ]
    return Dataset("d", "d", "0" * 64, "text", examples)


def build(model, **kw):
    return bm.build_memory(
        model, None, dataset(), progress=False, retrieval=EXACT, eta_grid=(1.0, 10.0), **kw
    )


def test_guard_ok_is_within_two_standard_errors():
    plain = np.array([10.0, 12.0, 11.0, 9.0])
    assert rule.guard_ok(plain, plain, 40.0) == (0.0, True)
    noisy = plain + np.array([0.5, -0.5, 0.4, -0.3])  # mean +0.1/40, noise larger
    assert rule.guard_ok(plain, noisy, 40.0)[1]
    worse = plain + np.array([1.0, 1.1, 0.9, 1.0])  # consistently worse
    change, ok = rule.guard_ok(plain, worse, 40.0)
    assert change == pytest.approx(0.1) and not ok


def test_guard_sampled_from_the_model_is_seeded(olmoe):
    a = sample_guard(olmoe, 0, count=3, length=8, seed=1)
    b = sample_guard(olmoe, 0, count=3, length=8, seed=1)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert len(a) == 3 and all(len(e.tokens) == 8 and e.tokens[0] == 0 for e in a)
    assert a[0].loss_mask == [0] + [1] * 7
    assert len({tuple(e.tokens) for e in a}) > 1


def test_calibration_records_its_trials_and_applies_the_scales(olmoe, tmp_path):
    plain = build(olmoe, recapture=0, calibrate=False)
    memory = build(olmoe, calibrate=True, recapture=0)
    c = memory.build["calibration"]
    assert c["eta"] == memory.build["eta"]
    assert c["guard_sequences"] == BuildConfig.guard_samples  # sampled from the model
    assert {t["eta"] for t in c["trials"][:3]} == {plain.build["eta"] * f for f in rule.ETA_FACTORS}
    accepted = [t["heldout_nll"] for t in c["trials"] if t["guard_ok"]]
    assert c["heldout_nll"] == min([c["plain_heldout_nll"], *accepted])
    on = [layer for layer, s in c["scales"].items() if s > 0]
    assert [int(x) for x in memory.layers] == sorted(int(x) for x in on) or not on
    for layer in memory.layers:  # keys equal (no re-capture): bandwidth is the default x scale
        scale = c["scales"][layer]
        assert memory.bandwidth[layer] == pytest.approx(plain.bandwidth[layer] * scale)


def test_a_guard_file_replaces_the_sampled_guard(olmoe_loaded, tmp_path):
    model, tokenizer = olmoe_loaded
    guard = tmp_path / "guard.jsonl"
    guard.write_text("".join(json.dumps({"text": f"guard text {i}"}) + "\n" for i in range(3)))
    data = tmp_path / "ref.jsonl"
    data.write_text("".join(json.dumps({"text": f"reference {i} " * 3}) + "\n" for i in range(8)))
    memory = bm.build_memory(
        model, tokenizer, data, progress=False, retrieval=EXACT, calibrate=True, guard=str(guard)
    )
    assert memory.build["calibration"]["guard_sequences"] == 3


def test_a_guard_that_refuses_everything_stops_the_build(olmoe, monkeypatch, tmp_path):
    monkeypatch.setattr(rule, "guard_ok", lambda *a: (1.0, False))
    out = tmp_path / "m.st"
    with pytest.raises(ValueError, match="no setting lowered the held-out NLL.*--no-calibrate"):
        build(olmoe, calibrate=True, out=out)
    assert not out.exists()  # a memory that would not help is not written
    kept = build(olmoe, calibrate=False, out=out)  # the way out the message names
    assert out.exists() and len(kept.layers) == 3


def test_calibration_needs_eta_auto_and_is_skipped_without_it(olmoe):
    memory = bm.build_memory(olmoe, None, dataset(), eta=3.0, progress=False, retrieval=EXACT)
    assert memory.build["config"]["calibrate"] and "calibration" not in memory.build
    off = build(olmoe, calibrate=False)
    assert "calibration" not in off.build and off.build["eta_auto"] is not None


def test_layer_eta_keeps_each_layers_best_eta(monkeypatch):
    """With a held-out NLL that is lowest at eta 3 in layer 0 and 9 in layer 1, the global
    scan keeps 3 and the per-layer scan moves layer 1 alone to 9."""
    best = {0: 3.0, 1: 9.0}

    def nll(model, batches):
        m = model.memory
        if m is None or batches != ["h"]:
            return np.ones(4), 4.0
        loss = sum((np.log(m[0][layer]) - np.log(b)) ** 2 for layer, b in best.items())
        return np.full(4, 1.0 - 1.0 / (1.0 + loss)), 4.0

    model = type("M", (), {"memory": None})()
    monkeypatch.setattr(cal, "batch_rows_nll", nll)
    monkeypatch.setattr(cal, "attach", lambda m, memory, *a, **k: setattr(m, "memory", memory))
    monkeypatch.setattr(cal, "detach", lambda m: setattr(m, "memory", None))

    def memory_for(eta, scales):
        return (eta if isinstance(eta, dict) else dict.fromkeys(best, eta), scales)

    args = (model, ["h"], ["g"], memory_for, 1.0, [0, 1], EXACT)
    plain = cal.calibrate(*args)
    assert plain["eta"] == 3.0 and plain["layer_eta"] is None
    c = cal.calibrate(*args, layer_eta=True)
    assert c["eta"] == 3.0 and c["layer_eta"] == {0: 3.0, 1: 9.0}
    assert c["heldout_nll"] < plain["heldout_nll"]
    per_layer = [t for t in c["trials"] if isinstance(t["eta"], dict)]
    assert len(per_layer) == 4  # eta x1/3 and x3 (x1 is the current one) in each kept layer


def test_the_build_stores_each_layers_chosen_eta(olmoe, monkeypatch):
    import mlx_knnmoe.build.refine as refine

    def fixed(eta):
        result = {"eta": 1.0, "scales": {0: 1.0, 1: 1.0, 2: 1.0}, "guard_sequences": 2}
        return lambda *a, **k: {**result, "layer_eta": eta}

    built = {}
    for name, eta in {"one": None, "ten": {0: 10.0, 1: 10.0, 2: 10.0}}.items():
        monkeypatch.setattr(refine, "calibrate", fixed(eta))
        built[name] = build(olmoe, calibrate=True, recapture=0)
    monkeypatch.setattr(refine, "calibrate", fixed({0: 1.0, 1: 10.0, 2: 1.0}))
    mixed = build(olmoe, calibrate=True, recapture=0, layer_eta=True)
    for layer, source in ((0, "one"), (1, "ten"), (2, "one")):
        assert np.allclose(np.array(mixed.logits[layer]), np.array(built[source].logits[layer]))
    assert not np.allclose(np.array(built["one"].logits[1]), np.array(built["ten"].logits[1]))
    assert "eta per layer: layer 0: 1, layer 1: 10, layer 2: 1" in summary(mixed)
    assert "eta per layer" not in summary(built["one"])


def test_calibration_with_several_steps_tries_grid_etas_only(olmoe):
    memory = build(olmoe, calibrate=True, recapture=0, steps=2, layer_eta=True)
    c = memory.build["calibration"]
    tried = set()
    for t in c["trials"]:
        tried |= set(t["eta"].values()) if isinstance(t["eta"], dict) else {t["eta"]}
    assert tried <= {1.0, 10.0} and c["eta"] in (1.0, 10.0)


def test_a_guard_file_may_hold_prompt_completion_records(olmoe_loaded, tmp_path):
    from mlx_knnmoe.build.refine import guard_examples
    from mlx_knnmoe.config import BuildConfig

    model, tokenizer = olmoe_loaded
    guard = tmp_path / "guard.jsonl"
    records = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(3)]
    guard.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = guard_examples(model, tokenizer, BuildConfig(guard=str(guard)))
    assert len(examples) == 3
    assert all(0 < sum(e.loss_mask) < len(e.tokens) for e in examples)  # completion only


def test_build_memory_command_says_why_it_stops_in_one_line(olmoe_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlx_knnmoe.commands.build_memory import cli

    monkeypatch.setattr(rule, "guard_ok", lambda *a: (1.0, False))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "reference text {i} {i}"}}\n' for i in range(6)))
    out = tmp_path / "m.st"
    args = ["--model", str(olmoe_dir), "--data", str(data), "--out", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args + ["--search", "exact"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert "the memory would not help" in line and "--no-calibrate" in line
    assert not out.exists()
