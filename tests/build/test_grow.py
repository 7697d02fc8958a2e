"""Memories that grow: --append-to and merge, with provenance, refusing other models."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import Memory, MemoryMismatchError
from mlx_knnmoe.build.pipeline import build_memory
from mlx_knnmoe.commands.build_memory import cli as build_cli
from mlx_knnmoe.commands.merge import cli as merge_cli
from mlx_knnmoe.memory.merging import merge_memories
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mlx_lm import load

    root = tmp_path_factory.mktemp("grow")
    model_dir = make_tiny_model_dir(root / "model", "olmoe")
    other_dir = make_tiny_model_dir(root / "other", "olmoe", seed=1)
    for name, lo in (("a", 0), ("b", 50)):
        rows = [
            {"prompt": f"Case {i}: fever?", "completion": f" yes {i}"} for i in range(lo, lo + 6)
        ]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir, other_dir, load(str(model_dir))


def arrays(m):
    return [np.array(m.keys[i]) for i in m.layers] + [np.array(m.logits[i]) for i in m.layers]


def test_append_equals_merging_separate_builds(setup):
    root, model_dir, _, (model, tok) = setup
    kw = dict(eta=2.0, progress=False, batch_tokens=64)
    a = build_memory(model, tok, root / "a.jsonl", out=root / "grow.st", **kw)
    b = build_memory(model, tok, root / "b.jsonl", **kw)
    grown = build_memory(model, tok, root / "b.jsonl", append_to=root / "grow.st", **kw)
    assert grown.path == root / "grow.st"  # written back in place: the user asked for it
    merged = merge_memories([a, b], ["a", "b"])
    with pytest.raises(ValueError, match="needs at least one memory"):
        merge_memories([])
    with pytest.raises(ValueError, match="2 memories but 1 names"):
        merge_memories([a, b], ["a"])
    for x, y in zip(arrays(grown), arrays(merged)):
        np.testing.assert_array_equal(x, y)
    on_disk = Memory.load(root / "grow.st")
    n_a, n_b = a.num_entries()[a.layers[0]], b.num_entries()[b.layers[0]]
    assert on_disk.num_entries()[on_disk.layers[0]] == n_a + n_b
    build = on_disk.build
    assert [d["name"] for d in build["datasets"]] == ["a", "b"]
    assert build["examples"] == 12 and build["entries"] == n_a + n_b and build["eta"] == 2.0
    assert len(build["parts"]) == 2 and build["tokens"] == a.build["tokens"] + b.build["tokens"]
    # appending again accumulates a third part
    again = build_memory(model, tok, root / "a.jsonl", append_to=root / "grow.st", **kw)
    assert len(again.build["parts"]) == 3 and again.build["examples"] == 18


def test_append_cli_reuses_the_memorys_eta(setup):
    root, model_dir, _, _ = setup
    base = root / "cli.st"
    common = ["--model", str(model_dir), "--batch-tokens", "64", "--quiet"]
    r = CliRunner().invoke(
        build_cli, common + ["--data", str(root / "a.jsonl"), "--out", str(base), "--eta", "0.5"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        build_cli, common + ["--data", str(root / "b.jsonl"), "--append-to", str(base)]
    )
    assert r.exit_code == 0, r.output
    assert "in 2 parts" in r.output
    m = Memory.load(base)
    assert [p["eta"] for p in m.build["parts"]] == [0.5, 0.5] and m.build["eta"] == 0.5


def test_append_and_merge_refuse_another_model(setup, tmp_path):
    root, model_dir, other_dir, (model, tok) = setup
    from mlx_lm import load

    other, other_tok = load(str(other_dir))
    theirs = build_memory(
        other, other_tok, root / "a.jsonl", eta=1.0, progress=False, out=tmp_path / "o.st"
    )
    with pytest.raises(MemoryMismatchError, match="cannot append to .*router_hash"):
        build_memory(model, tok, root / "b.jsonl", eta=1.0, progress=False, append_to=theirs.path)
    ours = build_memory(
        model, tok, root / "b.jsonl", eta=1.0, progress=False, out=tmp_path / "m.st"
    )
    r = CliRunner().invoke(
        merge_cli, [str(ours.path), str(theirs.path), "--out", str(tmp_path / "x.st")]
    )
    assert (
        r.exit_code != 0 and "built for different models" in r.output and "router_hash" in r.output
    )
    assert not (tmp_path / "x.st").exists()


def test_merge_cli(setup, tmp_path):
    root, _, _, (model, tok) = setup
    a = build_memory(model, tok, root / "a.jsonl", eta=1.0, progress=False, out=tmp_path / "a.st")
    b = build_memory(model, tok, root / "b.jsonl", eta=3.0, progress=False, out=tmp_path / "b.st")
    out = tmp_path / "ab.st"
    r = CliRunner().invoke(merge_cli, [str(a.path), str(b.path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = Memory.load(out)
    assert m.build["eta"] is None and [p["eta"] for p in m.build["parts"]] == [1.0, 3.0]
    for x, y in zip(arrays(m), arrays(merge_memories([a, b]))):
        np.testing.assert_array_equal(x, y)
    r = CliRunner().invoke(merge_cli, [str(a.path), str(b.path), "--out", str(out)])
    assert r.exit_code != 0 and "pass --force" in r.output
