"""The bundled model and the demo pipeline at reduced size: the direction of the result."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR
from mlx_knnmoe.commands.generate import cli as generate_cli
from mlx_knnmoe.evaluation.bundled_demo import result_table, run_demo, verdict

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(), reason="bundled model missing"
)


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "shift.st"
    lines = []
    result = run_demo(ref_examples=200, test_examples=120, save_memory=out, log=lines.append)
    return result, lines, out


def test_memory_helps_on_the_shifted_domain(reduced_demo):
    result, _, _ = reduced_demo
    shifted = result["scores"]["shift_test_text"]["variants"][1]
    lo, hi = shifted["vs_plain"]["ppl"]["ci95"]
    assert hi < 0, f"shifted-domain perplexity did not drop: [{lo}, {hi}]"
    assert shifted["routing"]["mean_lambda"] > 0.3


def test_original_domain_falls_back_to_the_router(reduced_demo):
    result, _, _ = reduced_demo
    for split, metric in (("orig_test_text", "ppl"), ("orig_test_mc", "acc")):
        knn = result["scores"][split]["variants"][1]
        d = knn["vs_plain"][metric]
        worse = d["ci95"][0] > 0 if metric == "ppl" else d["ci95"][1] < 0
        assert not worse, f"{split}: significant loss {d}"
        assert abs(d["diff"]) < (0.01 if metric == "ppl" else 0.02)


def test_report_names_every_split_and_the_generation(reduced_demo):
    result, lines, out = reduced_demo
    table = result_table(result["scores"])
    for split in ("shift_test_text", "orig_test_text", "shift_test_mc", "orig_test_mc"):
        assert split in table
    assert "shift_test_text: better" in verdict(result["scores"])
    sample = result["sample"]
    assert sample["prompt"].endswith("->") and sample["plain"] and sample["knn"]
    assert any("shift_ref_text.jsonl" in line for line in lines)
    assert out.exists()


def test_bundled_model_solves_the_original_domain_by_default():
    # generate defaults to the bundled model; "next" shifts each letter by one
    res = CliRunner().invoke(
        generate_cli, ["--prompt", "next: a b c d ->", "--max-tokens", "4", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.split() == ["b", "c", "d", "e"]


def test_demo_cli_refuses_to_overwrite_a_memory(tmp_path):
    target = tmp_path / "m.st"
    target.write_text("keep me")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "mlx_knnmoe", "demo", "--save-memory", str(target)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "--force" in p.stderr
    assert target.read_text() == "keep me"


def test_bundled_splits_are_disjoint():
    import json

    def strings(name):
        return {
            (r.get("prompt") or r["question"]).split(": ")[1].split(" ->")[0]
            for r in map(json.loads, open(DATA_DIR / f"{name}.jsonl"))
        }

    for reg in ("orig", "shift"):
        for fmt in ("text", "mc"):
            ref, test = strings(f"{reg}_ref_{fmt}"), strings(f"{reg}_test_{fmt}")
            train = strings(f"{reg}_train_{fmt}")
            assert not ref & test and not train & (ref | test)


def test_bundled_data_is_what_the_generator_writes(tmp_path):
    script = DATA_DIR.parent.parent.parent / "examples" / "bundled" / "generate_data.py"
    if not script.exists():  # an installed package without the repository
        pytest.skip("examples/ not available")
    subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True
    )
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
