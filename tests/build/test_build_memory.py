"""The memory-build pipeline: batching, resume, determinism, eta auto, metadata, the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_knnmoe.build.pipeline as bm
from mlx_knnmoe import KNNConfig, Memory, attach, detach, knn_stats, set_stats
from mlx_knnmoe.build.gradient import target_nll
from mlx_knnmoe.commands.build_memory import cli as build_cli
from mlx_knnmoe.data.batches import length_groups, make_batch
from mlx_knnmoe.data.examples import Dataset, Example
from tests.build.conftest import QUESTIONS


def build(olmoe_loaded, data, **kw):
    model, tokenizer = olmoe_loaded
    kw.setdefault("progress", False)
    kw.setdefault("batch_tokens", 96)
    return bm.build_memory(model, tokenizer, data, **kw)


def arrays(memory: Memory):
    return {
        f"{k}{layer}": np.array(getattr(memory, k)[layer])
        for k in ("keys", "logits")
        for layer in memory.layers
    }


def test_length_groups_respect_the_token_budget_and_are_deterministic():
    lengths = [5, 17, 9, 17, 3, 12, 8]
    groups = length_groups(lengths, batch_tokens=36)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) * max(lengths[i] for i in g) <= 36 for g in groups)
    assert groups[0] == [1, 3]  # longest first, ties in input order
    assert groups == length_groups(lengths, batch_tokens=36)
    assert length_groups([50], batch_tokens=10) == [[0]]  # a long example still gets a batch


def test_make_batch_pads_and_keeps_positions():
    ex = [Example([1, 2, 3, 4], [0, 0, 1, 1], "a:1"), Example([5, 6], [0, 1], "a:2")]
    b = make_batch(ex, [0, 1], keep="all")
    assert b.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]] and b.num_tokens == 6
    assert b.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert b.keep_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    t = make_batch(ex, [0, 1], keep="targets")  # positions that predict a target
    assert t.keep_mask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]


def test_build_saves_a_memory_with_its_provenance(olmoe_loaded, data, tmp_path):
    out = tmp_path / "qa.st"
    memory = build(olmoe_loaded, data, out=out, eta=2.0, format="completion")
    model, tokenizer = olmoe_loaded
    loaded_memory = Memory.load(out)
    n_tokens = memory.build["tokens"]
    assert memory.build["examples"] == len(QUESTIONS)
    # every non-padding position but each row's last (no successor) is stored
    assert all(n == n_tokens - len(QUESTIONS) for n in loaded_memory.num_entries().values())
    b = loaded_memory.build
    assert b["eta"] == 2.0 and b["steps"] == 1 and b["eta_auto"] is None
    ds = b["datasets"][0]
    assert ds["name"] == "qa" and ds["format"] == "completion" and len(ds["sha256"]) == 64
    assert loaded_memory.fingerprint["model_type"] == "olmoe"
    assert all(v > 0 for v in loaded_memory.bandwidth.values())
    assert not (tmp_path / "qa.st.partial").exists()
    with pytest.raises(FileExistsError, match="--force"):
        build(olmoe_loaded, data, out=out, eta=2.0)


def test_build_is_deterministic(olmoe_loaded, data):
    a = arrays(build(olmoe_loaded, data, eta=1.0, seed=3))
    b = arrays(build(olmoe_loaded, data, eta=1.0, seed=3))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_memory_lowers_nll_of_its_own_data_and_unrelated_memory_falls_back(olmoe_loaded, tmp_path):
    model, tokenizer = olmoe_loaded
    rng = np.random.default_rng(0)
    own = [Example(list(rng.integers(0, 60, 24)), [0] + [1] * 23, f"own:{i}") for i in range(6)]
    far = [Example(list(rng.integers(200, 256, 24)), [0] + [1] * 23, f"far:{i}") for i in range(6)]
    batch = make_batch(own, list(range(6)))
    plain = float(target_nll(model, batch.tokens, batch.loss_mask))

    def nll_with(examples):
        ds = Dataset("d", "d", "0" * 64, "text", examples)
        memory = bm.build_memory(model, tokenizer, ds, eta=3.0, progress=False)
        attach(model, memory, KNNConfig(k=1, mix="logits"))
        set_stats(model)
        nll = float(target_nll(model, batch.tokens, batch.loss_mask))
        lam = np.mean([s["mean_lambda"] for s in knn_stats(model).values()])
        detach(model)
        return nll, lam

    nll_own, lam_own = nll_with(own)
    nll_far, lam_far = nll_with(far)
    assert nll_own < plain * 0.99 and lam_own > 0.9, (nll_own, plain, lam_own)
    # measured: lambda 0.095 (vs 1.0 on its own data), NLL change 0.002%
    assert lam_far < 0.15 and abs(nll_far - plain) / plain < 0.005, (nll_far, plain, lam_far)


def test_interrupted_build_resumes_without_recomputing(olmoe_loaded, data, tmp_path, monkeypatch):
    calls = []
    real = bm.optimise_batch
    monkeypatch.setattr(bm, "optimise_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = arrays(build(olmoe_loaded, data, eta=1.0))
    n_batches = len(calls)
    assert n_batches >= 4
    calls.clear()

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "optimise_batch", flaky)
    out = tmp_path / "r.st"
    with pytest.raises(KeyboardInterrupt):
        build(olmoe_loaded, data, out=out, eta=1.0)
    assert not out.exists() and len(list((tmp_path / "r.st.partial").glob("batch-*"))) == 2
    calls.clear()
    monkeypatch.setattr(bm, "optimise_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = arrays(build(olmoe_loaded, data, out=out, eta=1.0))
    assert len(calls) == n_batches - 2
    assert resumed.keys() == reference.keys()
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)
    assert not (tmp_path / "r.st.partial").exists()


def test_resume_with_other_settings_is_refused(olmoe_loaded, data, tmp_path, monkeypatch):
    real = bm.optimise_batch

    def once(*a, **k):
        monkeypatch.setattr(bm, "optimise_batch", _raise)
        return real(*a, **k)

    monkeypatch.setattr(bm, "optimise_batch", once)
    out = tmp_path / "s.st"
    with pytest.raises(KeyboardInterrupt):
        build(olmoe_loaded, data, out=out, eta=1.0)
    monkeypatch.setattr(bm, "optimise_batch", real)
    with pytest.raises(ValueError, match="scope: partial has 'sequence', now 'token'.*--restart"):
        build(olmoe_loaded, data, out=out, eta=1.0, scope="token")
    build(olmoe_loaded, data, out=out, eta=1.0, scope="token", restart=True)
    assert Memory.load(out).build["scope"] == "token"


def _raise(*a, **k):
    raise KeyboardInterrupt


def test_eta_auto_scores_the_grid_on_held_out_examples(olmoe_loaded, data):
    memory = build(
        olmoe_loaded, data, eta="auto", eta_grid=(0.5, 4.0, 1000.0), heldout=0.25, calibrate=False
    )
    t = memory.build["eta_auto"]
    assert t["grid"] == [0.5, 4.0, 1000.0] and t["heldout_examples"] == 2
    assert len(t["heldout_nll"]) == 3 and t["plain_nll"] > 0
    scored = {e: s for e, s in zip(t["grid"], t["heldout_nll"]) if s is not None}
    assert memory.build["eta"] == min(scored, key=scored.get)
    # the chosen eta is applied to every entry, held-out ones included
    assert memory.build["entries"] == memory.build["tokens"] - len(QUESTIONS)
    assert memory.retrieval["mix"] == "topk" and memory.retrieval["k"] == KNNConfig.k
    z_step = build(olmoe_loaded, data, eta=memory.build["eta"])
    assert memory.num_entries() == z_step.num_entries()


def test_eta_grid_stops_once_larger_steps_only_get_worse(monkeypatch):
    import mlx_knnmoe.build.eta_choice as tuning

    nll = {None: 4.0, 0.1: 3.9, 0.3: 3.5, 1.0: 3.0, 3.0: 3.4, 10.0: 3.6, 30.0: 2.0, 100.0: 9.0}
    monkeypatch.setattr(tuning, "heldout_nll", lambda m, b, memory, c: nll[memory])
    grid = (100.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # scored in increasing order
    result = tuning.choose_eta(None, [], lambda e: e, grid, KNNConfig(k=1))
    assert result["grid"] == sorted(grid) and result["eta"] == 1.0
    assert result["heldout_nll"] == [3.9, 3.5, 3.0, 3.4, 3.6, None, None]
    full = tuning.choose_eta(None, [], lambda e: e, grid, KNNConfig(k=1), patience=None)
    assert full["eta"] == 30.0 and None not in full["heldout_nll"]
    nll.update({0.1: 4.1, 0.3: 4.2, 1.0: 4.3})
    with pytest.warns(UserWarning, match="no eta .* lowered the held-out NLL"):
        tuning.choose_eta(None, [], lambda e: e, (0.1, 0.3, 1.0), KNNConfig(k=1))


def test_eta_auto_needs_two_examples(olmoe_loaded, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "only one example here"}) + "\n")
    with pytest.raises(ValueError, match="at least 2 examples.*--eta"):
        build(olmoe_loaded, path)


def test_cli_builds_prints_the_eta_table_and_refuses_overwrite(olmoe_dir, data, tmp_path):
    out = tmp_path / "cli.st"
    args = ["--model", str(olmoe_dir), "--data", str(data), "--out", str(out)]
    args += ["--eta-grid", "0.5,2", "--batch-tokens", "128", "--quiet", "--no-calibrate"]
    result = CliRunner().invoke(build_cli, args)
    assert result.exit_code == 0, result.output
    assert "eta auto on 1 held-out examples" in result.output and "<- chosen" in result.output
    assert Memory.load(out).build["eta_auto"]["grid"] == [0.5, 2.0]
    again = CliRunner().invoke(build_cli, args)
    assert again.exit_code != 0 and "exists; pass --force" in again.output
    bad = CliRunner().invoke(build_cli, args + ["--force", "--eta", "-1"])
    assert bad.exit_code != 0 and "eta must be finite and > 0" in bad.output


def test_cli_reports_bad_rows_with_file_and_line(olmoe_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n" + '{"prompt": "q"}\n')
    args = ["--model", str(olmoe_dir), "--data", str(path), "--out", str(tmp_path / "x.st")]
    result = CliRunner().invoke(build_cli, args + ["--format", "completion"])
    assert result.exit_code != 0
    assert "bad.jsonl:2" in result.output and "completion" in result.output


def test_progress_bar_shows_rate(olmoe_loaded, data, capsys):
    build(olmoe_loaded, data, eta=1.0, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "nll=" in err


def test_build_refuses_a_model_with_a_memory_attached(olmoe_loaded, data):
    model, _ = olmoe_loaded
    memory = build(olmoe_loaded, data, eta=1.0)
    attach(model, memory)
    try:
        with pytest.raises(ValueError, match="detach"):
            build(olmoe_loaded, data, eta=1.0)
    finally:
        detach(model)


def test_eta_tuning_swaps_values_without_rebuilding_the_index(olmoe_loaded, data):
    import mlx_knnmoe.build.eta_choice as tuning
    from mlx_knnmoe.retrieval.attach import routers

    model, tokenizer = olmoe_loaded
    base = build(olmoe_loaded, data, eta=1.0, retrieval=KNNConfig(k=1))
    other = Memory(base.keys, {i: -v for i, v in base.logits.items()}, base.fingerprint)
    batches = [make_batch(build_examples(tokenizer, data), [0, 1, 2])]
    config = KNNConfig(k=1, search="hnsw")
    tuning.heldout_nll(model, batches, base, config)
    searcher = next(iter(routers(model).values())).memory.searchers
    swapped = tuning.heldout_nll(model, batches, other, config)
    assert next(iter(routers(model).values())).memory.searchers is searcher
    detach(model)
    fresh = tuning.heldout_nll(model, batches, other, config)
    detach(model)
    assert swapped == pytest.approx(
        fresh, rel=1e-5
    )  # hnsw graph build is threaded: float order varies
    assert swapped != pytest.approx(tuning.heldout_nll(model, batches, base, config), rel=1e-4)
    detach(model)


def build_examples(tokenizer, path):
    from mlx_knnmoe.data.examples import load_dataset

    return load_dataset(path, tokenizer, shuffle=False).examples
