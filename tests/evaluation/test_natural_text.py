"""The natural-text benchmark end to end at smoke size: files split, a tiny qwen3_moe trained
for a few steps in PyTorch, converted with ``mlx_knnmoe convert``, memories built and scored
(examples/natural_text/)."""

import json

import pytest

from tests.helpers import load_script

pytest.importorskip("torch")
data = load_script("examples/natural_text/data.py")
train = load_script("examples/natural_text/train.py")
run = load_script("examples/natural_text/run.py")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("natural")
    if len(data.python_sources()) < 50 or len(data.c_headers()) < 50:
        pytest.skip("this machine lacks the Python sources or C headers the benchmark reads")
    args = data.parse_args(["--out", str(root / "data"), "--scale", "0.1"])
    args.shift_train_files, args.max_train_files = 2, 4
    manifest = data.make(args)
    assert manifest["chunks"]["shifted_reference"] == 16
    tiny = ["--data", str(root / "data"), "--out", str(root / "model"), "--steps", "3"]
    tiny += ["--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "4"]
    tiny += ["--expert-size", "32", "--seq-len", "32", "--batch", "4", "--vocab", "300"]
    tiny += ["--max-chars", "40000", "--log-every", "1"]
    info = train.train(train.parse_args(tiny))
    assert info["steps"] == 3
    train.convert(root / "model")
    return run.Bench("smoke", root / "model" / "mlx", root / "data", "text"), root, manifest


def test_splits_are_disjoint_by_file(bench):
    _, _, manifest = bench
    seen = {}
    for split, files in manifest["files"].items():
        for path, _ in files:
            assert path not in seen or split == seen[path], (path, split, seen[path])
            seen[path] = split
    assert manifest["shift_train_files"] == 2


def test_smoke_run_builds_scores_and_reports(bench):
    b, root, _ = bench
    config = json.loads((b.model / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 4
    record = json.loads((b.model / "training.json").read_text())
    assert record["steps"] == 3
    assert set(record["versions"]) == {"torch", "transformers", "tokenizers"}
    assert len(record["train_sha256"]) == 64
    base = run.VARIANTS["recapture 1, calibrate"]
    last = run.Variant(base.settings, "last layer", None, run.last_layers(1))
    results = run.run(b, {"recapture 1, calibrate": base, "last": last})
    row, last_row = results["rows"]
    assert last_row["build_seconds"] >= row["build_seconds"]  # one build, shared
    assert last_row["build_seconds"] < row["build_seconds"] + 5
    assert list(last_row["splits"]["shifted_test"]["lambda"]) == ["1"]
    for split in b.tests:
        cell = row["splits"][split]
        assert cell["ci95"][0] <= cell["diff"] <= cell["ci95"][1]
        assert len(cell["lambda"]) == 2
    plain_keys, recaptured = results["oracle"]
    assert min(recaptured["splits"]["shifted_test"]["lambda"].values()) > 0.99
    assert recaptured["recapture_seconds"] > 0 and plain_keys["recapture_seconds"] is None
    report = root / "EXPERIMENTS.md"
    report.write_text("# Experiments\n\nkept\n")
    for _ in range(2):  # a rerun replaces its section
        run.write_section(report, "smoke", run.report("smoke", results))
    text = report.read_text()
    assert text.count("<!-- smoke: begin -->") == 1 and "kept" in text
    assert "| oracle, recapture 1: memory of the shifted test examples themselves |" in text


def test_rerun_rows_replace_their_own_and_keep_the_others():
    old = {
        "plain": {"a": 1.0},
        "rows": [{"name": "defaults", "v": 1}, {"name": "recapture 1", "v": 1}],
        "oracle": [{"name": "oracle, recapture 0", "v": 1}],
        "descriptions": {"defaults": "old"},
    }
    new = {
        "plain": {"a": 2.0},
        "rows": [{"name": "calibrate, K 4", "v": 2}, {"name": "defaults", "v": 2}],
        "oracle": [],
        "descriptions": {"calibrate, K 4": "new"},
    }
    m = run.merged(old, new)
    assert [(r["name"], r["v"]) for r in m["rows"]] == [
        ("defaults", 2),
        ("recapture 1", 1),
        ("calibrate, K 4", 2),
    ]
    assert m["oracle"] == old["oracle"] and m["plain"] == {"a": 2.0}
    assert m["descriptions"] == {"defaults": "old", "calibrate, K 4": "new"}
