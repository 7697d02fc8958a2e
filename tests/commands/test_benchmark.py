"""mlx_knnmoe.benchmark at a minuscule size: every case runs and reports a ratio."""

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe.commands.benchmark import cli
from mlx_knnmoe.speed import realistic, server_throughput, shapes
from mlx_knnmoe.speed.bench import BenchModel, markdown_table
from mlx_knnmoe.speed.build_throughput import build_table, run_build
from mlx_knnmoe.speed.inference import run, synthetic_memory, table

SHAPE = BenchModel(hidden=64, layers=2, experts=8, top_k=2, vocab=256)


def test_build_benchmark_measures_every_case():
    rows = run_build(SHAPE, batch=2, seq_len=16, batches=1, log=lambda m: None)
    names = [r["case"] for r in rows]
    assert "build step, dense surrogate k'=4k" in names
    assert "build_memory defaults (S=1, surrogate auto, eta auto)" in names
    assert "build_memory, surrogate off (S=1, eta auto)" in names
    for r in rows:
        assert r["ratio"] > 0 and r["build_tps"] > 0 and r["forward_tps"] > 0
    text = build_table(rows)
    assert all(n in text for n in names)


def test_inference_benchmark_reports_ratios_per_size_and_search(tmp_path):
    rows = run(
        SHAPE,
        sizes=(200,),
        searches=("exact", "hnsw"),
        prompt_tokens=16,
        gen_tokens=4,
        repeats=1,
        workdir=tmp_path,
        log=lambda m: None,
    )
    assert [(r["search"], r["memory"]) for r in rows] == [
        ("none", 0),
        ("exact", 200),
        ("hnsw", 200),
    ]
    assert all(r["decode_ratio"] > 0 and r["prefill_ratio"] > 0 for r in rows)
    assert list(tmp_path.glob("bench-200.st"))  # on disk, so hnswlib can cache its index
    text = table(rows)
    assert "exact" in text and "hnsw" in text


def test_server_benchmark_measures_every_scenario_against_mlx_lm_server():
    rows = server_throughput.run(
        SHAPE, size=100, requests=6, concurrency=3, gen_tokens=3, repeats=1, log=lambda m: None
    )
    assert [r["scenario"] for r in rows] == list(server_throughput.SCENARIOS)
    assert rows[0]["ratio"] == 1.0 and all(r["requests_per_s"] > 0 for r in rows)
    assert "alternating a, b, none" in server_throughput.table(rows)


def test_realistic_shape_benchmark_reports_bytes_recall_and_ratios(monkeypatch):

    tiny = dict(shapes.SHAPES["olmoe-1b-7b"], hidden_size=64, intermediate_size=64)
    tiny.update(num_attention_heads=4, num_key_value_heads=4, num_experts=8, vocab_size=256)
    monkeypatch.setitem(shapes.SHAPES, "tiny-olmoe", tiny)
    rows = realistic.run_shape(
        "tiny-olmoe",
        examples=20,
        tokens_per_example=30,
        formats=("int8-pca2-top4", "float16"),
        searches=("ivf", "exact"),
        nprobe=2,
        prompt_tokens=8,
        gen_tokens=3,
        repeats=1,
        log=lambda m: None,
    )
    assert [(r["format"], r["search"]) for r in rows] == [
        ("int8-pca2-top4", "ivf nprobe 2"),
        ("int8-pca2-top4", "exact"),
        ("float16", "ivf nprobe 2"),
        ("float16", "exact"),
    ]
    model = shapes.quantised_random_model(shapes.reduced_config("tiny-olmoe", 2))
    whole = shapes.full_model_bytes(model, "tiny-olmoe")
    for r in rows:
        assert r["entries"] == 600 and r["decode_ratio"] > 0 and r["prefill_ratio"] > 0
        assert r["full_model_memory_bytes"] == r["bytes_per_layer"] * 16
        assert abs(r["share_of_model"] - r["full_model_memory_bytes"] / whole) < 1e-3
        assert 0 < r["recall_at_1"] <= 1 and 0 < r["recall_at_1_random"] <= 1
    assert rows[1]["recall_at_1"] == rows[1]["recall_at_1_random"] == 1.0  # exact vs itself
    # int8 keys at half the dimension and top-4 of 8 values: well under float16's bytes
    assert rows[0]["bytes_per_layer"] < 0.5 * rows[2]["bytes_per_layer"]
    assert "| tiny-olmoe | int8-pca2-top4 | ivf nprobe 2 |" in realistic.shape_table(rows)


def test_held_out_queries_are_entries_the_memory_does_not_hold(olmoe):

    full = synthetic_memory(olmoe, 300, sequences=1, noise="data")
    memory, queries = realistic.held_out(full, 40)
    for layer in full.layers:
        assert memory.keys[layer].shape[0] == 260 and queries[layer].shape[0] == 40
        kept, asked = np.array(memory.keys[layer]), np.array(queries[layer])
        assert np.array_equal(asked, np.array(full.keys[layer])[260:])
        assert not (kept[None] == asked[:, None]).all(-1).any()  # none of them is stored
    assert realistic.parse_format("int8-pca16-top8") == dict(
        keys="int8", values="float16", pca=16, top=8
    )
    for bad in ("int8-pcaX", "int8-top0", "int8-bits4"):
        with pytest.raises(ValueError, match="expected KEYS"):
            realistic.parse_format(bad)


def test_a_bad_format_is_one_line_before_any_model_is_built():

    result = CliRunner().invoke(cli, ["--shape", "olmoe-1b-7b", "--formats", "int8-bits4"])
    assert result.exit_code == 2 and "--formats" in result.output
    assert "expected KEYS[-pcaN][-topM], found 'bits4'" in result.output


def test_markdown_table_right_aligns_the_cells_with_a_format_spec():
    rows = [dict(name="x", value=1.234), dict(name="y", value=10.0)]
    text = markdown_table(rows, "name | value", "{name} | {value:.2f}")
    assert text.splitlines() == ["| name | value |", "|---|---:|", "| x | 1.23 |", "| y | 10.00 |"]
