"""Build checkpoints that cannot be trusted are recomputed, never used: a killed build resumed
over corrupted, swapped, truncated or foreign batches gives the same memory bit for bit."""

import shutil

import numpy as np
import pytest

import mlx_knnmoe.build.pipeline as bm
from tests.build.test_build_memory import arrays, build
from tests.helpers import dead_pid


def interrupted(olmoe_loaded, data, out, monkeypatch, after: int, **kw) -> list[int]:
    """Run a build that is killed in its batch number ``after`` (1-based); return the calls
    counter the rest of the test shares."""
    real, calls = bm.optimise_batch, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bm, "optimise_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(olmoe_loaded, data, out=out, eta=1.0, **kw)
    calls.clear()
    monkeypatch.setattr(bm, "optimise_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_kill_then_resume_over_corrupted_batches_recomputes_them(
    olmoe_loaded, data, tmp_path, monkeypatch
):
    reference = arrays(build(olmoe_loaded, data, eta=1.0, batch_tokens=48))
    out = tmp_path / "r.st"
    calls = interrupted(olmoe_loaded, data, out, monkeypatch, after=5, batch_tokens=48)
    partial = tmp_path / "r.st.partial"
    batches = sorted(partial.glob("batch-*.safetensors"))
    assert len(batches) == 4
    raw = bytearray(batches[0].read_bytes())
    raw[-200:-136] = b"\xff" * 64  # 64 bytes of the data set to 0xff
    batches[0].write_bytes(raw)
    shutil.copy(batches[2], batches[1])  # a batch replaced by a copy of another
    batches[3].write_bytes(batches[3].read_bytes()[:300])  # truncated
    (partial / f".{batches[2].name}.{dead_pid()}.tmp.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / f".r.st.{dead_pid()}.tmp.safetensors").write_bytes(b"x" * 1000)  # final write
    with pytest.warns(UserWarning) as notes:
        resumed = arrays(build(olmoe_loaded, data, out=out, eta=1.0, batch_tokens=48))
    text = [str(n.message) for n in notes]
    assert any("batch-000000.safetensors: arrays [" in t and "sha256" in t for t in text), text
    assert any("batch-000001.safetensors: holds batch 2, not batch 1" in t for t in text), text
    assert any("batch-000003.safetensors: unreadable or incomplete" in t for t in text), text
    assert all(t.endswith("recomputing this batch") and "\n" not in t for t in text), text
    n_batches = len(calls) + 1  # batch 2 was the only one reused
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)
    assert n_batches >= 5 and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.jsonl", "r.st"]  # no temporary


def test_batches_of_other_settings_are_not_reused_without_a_manifest(
    olmoe_loaded, data, tmp_path, monkeypatch
):
    reference = arrays(build(olmoe_loaded, data, eta=1.0, seed=0))
    out = tmp_path / "s.st"
    interrupted(olmoe_loaded, data, out, monkeypatch, after=3, seed=1)
    (tmp_path / "s.st.partial" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="was made with other build settings; recomputing"):
        resumed = arrays(build(olmoe_loaded, data, out=out, eta=1.0, seed=0))
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)


def test_an_unreadable_manifest_is_replaced_with_a_notice(
    olmoe_loaded, data, tmp_path, monkeypatch
):
    out = tmp_path / "m.st"
    calls = interrupted(olmoe_loaded, data, out, monkeypatch, after=3)
    (tmp_path / "m.st.partial" / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"manifest.json: unreadable .*writing a new one"):
        build(olmoe_loaded, data, out=out, eta=1.0)
    assert out.exists() and len(calls) >= 2


def test_a_build_failing_before_its_first_batch_leaves_no_partial_directory(
    olmoe_loaded, data, tmp_path, monkeypatch
):
    interrupted(olmoe_loaded, data, tmp_path / "f.st", monkeypatch, after=1)
    assert not (tmp_path / "f.st.partial").exists()
    interrupted(olmoe_loaded, data, tmp_path / "g.st", monkeypatch, after=2)
    assert (tmp_path / "g.st.partial").is_dir()  # one batch done: kept for the resume
