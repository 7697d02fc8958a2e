"""mlx_knnmoe.benchmark at a minuscule size: every case runs and reports a ratio."""

from mlx_knnmoe.speed import server_throughput
from mlx_knnmoe.speed.build_throughput import build_table, run_build
from mlx_knnmoe.speed.inference import run, table

SHAPE = dict(hidden=64, layers=2, experts=8, top_k=2, vocab=256)


def test_build_benchmark_measures_every_case():
    rows = run_build(**SHAPE, batch=2, seq_len=16, batches=1, log=lambda m: None)
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
        **SHAPE,
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
        **SHAPE, size=100, requests=6, concurrency=3, gen_tokens=3, repeats=1, log=lambda m: None
    )
    assert [r["scenario"] for r in rows] == list(server_throughput.SCENARIOS)
    assert rows[0]["ratio"] == 1.0 and all(r["requests_per_s"] > 0 for r in rows)
    assert "alternating a, b, none" in server_throughput.table(rows)
