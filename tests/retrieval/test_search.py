"""Exact search against NumPy, hnswlib recall against exact search, the index cache."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe.retrieval.search import ExactSearch, HnswSearch, choose_search
from tests.helpers import captured, dead_pid, tokens
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def router_inputs():
    """Router inputs of layer 1 from two disjoint token sets: memory keys and queries."""
    model = tiny_model("olmoe")
    keys = captured(model, tokens(20, (16, 64)))[1][0]
    queries = captured(model, tokens(21, (4, 64)))[1][0]
    return np.array(keys), np.array(queries)


@pytest.mark.parametrize("similarity", ["rbf", "cosine"])
def test_exact_search_matches_numpy(router_inputs, similarity):
    keys, queries = router_inputs
    idx, dist = ExactSearch(mx.array(keys), similarity)(mx.array(queries), 4)
    idx, dist = np.array(idx), np.array(dist)
    if similarity == "rbf":
        full = ((queries[:, None] - keys[None]) ** 2).sum(-1)
        want = np.sort(full, -1)[:, :4]
        got = np.sort(dist, -1)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    else:
        qn = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
        kn = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
        full = qn @ kn.T
        np.testing.assert_allclose(np.sort(dist, -1), np.sort(full, -1)[:, -4:], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, idx, -1), dist, rtol=1e-3, atol=1e-3)


def test_exact_search_with_fewer_entries_than_k():
    keys = mx.array(np.eye(3, 8, dtype=np.float32))
    idx, dist = ExactSearch(keys, "rbf")(keys, 5)
    assert idx.shape == (3, 3)


@pytest.mark.parametrize("similarity", ["rbf", "cosine"])
def test_hnsw_recall_at_1(router_inputs, similarity):
    keys, queries = router_inputs
    exact, _ = ExactSearch(mx.array(keys), similarity)(mx.array(queries), 1)
    approx, dist = HnswSearch(keys, similarity)(mx.array(queries), 1)
    recall = (np.array(exact)[:, 0] == np.array(approx)[:, 0]).mean()
    assert len(keys) == 1024 and recall >= 0.95, f"recall@1 {recall:.3f}"
    if similarity == "rbf":
        nearest = ((queries - keys[np.array(approx)[:, 0]]) ** 2).sum(-1)
        np.testing.assert_allclose(np.array(dist)[:, 0], nearest, rtol=1e-3, atol=1e-3)


def test_hnsw_index_is_cached_and_rebuilt_when_stale(tmp_path, router_inputs):
    keys, queries = router_inputs
    first = HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1")
    assert first.loaded_from_cache == "none"
    files = list(tmp_path.glob("layer1-*.bin"))
    assert len(files) == 1
    again = HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1")
    assert again.loaded_from_cache == "all"
    a, _ = first(mx.array(queries), 3)
    b, _ = again(mx.array(queries), 3)
    assert np.array_equal(np.array(a), np.array(b))
    changed = HnswSearch(keys[10:], "rbf", cache_dir=tmp_path, name="layer1")
    assert changed.loaded_from_cache == "none"
    remaining = list(tmp_path.glob("layer1-*.bin"))
    assert len(remaining) == 1 and remaining != files


def test_hnsw_cache_grows_with_an_appended_memory(tmp_path, router_inputs):
    keys, queries = router_inputs
    HnswSearch(keys[:600], "rbf", cache_dir=tmp_path, name="layer1")
    grown = HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1")
    assert grown.loaded_from_cache == "prefix"  # only the 424 new keys were inserted
    assert len(list(tmp_path.glob("layer1-*.bin"))) == 1
    assert HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1").loaded_from_cache == "all"
    exact, _ = ExactSearch(mx.array(keys), "rbf")(mx.array(queries), 1)
    approx, _ = grown(mx.array(queries), 1)
    assert (np.array(exact) == np.array(approx)).mean() >= 0.95  # new keys are found too
    assert (np.array(approx) >= 600).any()


def test_auto_choice():
    assert choose_search("auto", 500, 1024) == "exact"
    assert choose_search("auto", 10_000, 1024) == "measure"
    assert choose_search("exact", 100_000, 1024) == "exact"
    assert choose_search("hnsw", 10, 1024) == "hnsw"
    with pytest.raises(ValueError, match="unknown search 'faiss'"):
        choose_search("faiss", 10, 10)


def test_model_with_hnsw_matches_exact_and_caches_beside_the_memory(tmp_path):
    from mlx_knnmoe import KNNConfig, attach
    from tests.helpers import memory_from

    model = tiny_model("olmoe")
    toks = tokens(0, (2, 12))
    path = memory_from(model, tokens(5, (4, 12)), lambda z: -z).save(tmp_path / "m.st")
    outputs = {}
    for search in ("exact", "hnsw"):
        attach(model, path, KNNConfig(search=search, mix="logits"))
        outputs[search] = np.array(model(toks))
    np.testing.assert_allclose(outputs["hnsw"], outputs["exact"], rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "m.st.hnsw").glob("layer*-l2-*.bin"))) == 3


def test_a_corrupt_or_foreign_hnsw_cache_is_rebuilt_with_a_notice(tmp_path, router_inputs):
    keys, queries = router_inputs
    exact = np.array(ExactSearch(mx.array(keys), "rbf")(mx.array(queries), 1)[0])[:, 0]
    HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1")
    (cached,) = tmp_path.glob("layer1-*.bin")
    good = cached.read_bytes()

    def reload() -> HnswSearch:
        with pytest.warns(UserWarning) as notes:
            search = HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1")
        assert len(notes) == 1 and "\n" not in str(notes[0].message)
        assert str(notes[0].message).endswith("rebuilding the hnsw index")
        assert search.loaded_from_cache == "none"
        found = np.array(search(mx.array(queries), 1)[0])[:, 0]
        assert (found == exact).mean() >= 0.95  # a working index of these keys
        return str(notes[0].message)

    cached.write_bytes(good[: len(good) // 2])  # truncated
    assert f"{cached}: unreadable" in reload()
    cached.write_bytes(good[:200] + bytes(len(good) - 200))  # zeroed past the header
    reload()
    # the index of other keys (another layer, same size) copied over this one: once with
    # other neighbours, once with the same neighbour structure (a scaled copy of the keys)
    for other in (np.roll(keys, 7, axis=0) + 0.5, keys * 1.1):
        HnswSearch(other, "rbf", cache_dir=tmp_path / "o", name="layer1")
        cached.write_bytes(next((tmp_path / "o").glob("*.bin")).read_bytes())
        assert "does not hold these keys" in reload()
    small = HnswSearch(keys[:100], "rbf", cache_dir=tmp_path / "s", name="layer1")
    assert small.size == 100
    cached.write_bytes(next((tmp_path / "s").glob("*.bin")).read_bytes())
    assert "holds 100 entries, the keys are 1024" in reload()
    assert HnswSearch(keys, "rbf", cache_dir=tmp_path, name="layer1").loaded_from_cache == "all"


def test_a_killed_index_write_leaves_no_temporary_behind(tmp_path, router_inputs):
    keys, _ = router_inputs
    stale = tmp_path / f".layer1-l2-m16-x.bin.{dead_pid()}.tmp"
    stale.write_bytes(b"x" * 100)
    HnswSearch(keys[:50], "rbf", cache_dir=tmp_path, name="layer1")
    assert not stale.exists()
