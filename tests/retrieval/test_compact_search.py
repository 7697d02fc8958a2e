"""Search over compact keys (float16, bfloat16, int8 with row scales, any dimension) against
a NumPy reference; the inverted-file index against exact search on router inputs captured
from a model; auto's measured choice."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, Memory
from mlx_knnmoe.arch.specs import moe_layers, routing_map, spec_for
from mlx_knnmoe.memory.compress import convert_keys, project
from mlx_knnmoe.memory.file_format import dequantize_rows, quantize_rows
from mlx_knnmoe.memory.ivf import fill_lists, train_ivf
from mlx_knnmoe.retrieval.layer_memory import LayerMemory
from mlx_knnmoe.retrieval.search import ExactSearch, IvfSearch, KeyRows
from tests.helpers import captured, memory_from, tokens


def _reference(keys: np.ndarray, queries: np.ndarray, similarity: str) -> np.ndarray:
    """Squared L2 or cosine [T, M] in float64 (the reference)."""
    k, q = keys.astype(np.float64), queries.astype(np.float64)
    if similarity == "cosine":
        k = k / np.linalg.norm(k, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return q @ k.T
    return (q * q).sum(1)[:, None] - 2 * q @ k.T + (k * k).sum(1)[None]


def _stored(keys: np.ndarray, fmt: str):
    """(MLX keys as stored, scales or None, the float64 values they stand for)."""
    if fmt == "int8":
        q, s = quantize_rows(keys)
        return mx.array(q), mx.array(s), dequantize_rows(q, s)
    stored = mx.array(keys).astype(getattr(mx, fmt))
    return stored, None, np.array(stored.astype(mx.float32))


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("dim", [40, 128])
@pytest.mark.parametrize("similarity", ["rbf", "cosine"])
def test_exact_search_on_compact_keys_matches_numpy(fmt, dim, similarity):
    rng = np.random.default_rng(dim)
    keys = rng.normal(size=(700, dim)).astype(np.float32)
    queries = rng.normal(size=(20, dim)).astype(np.float32)
    stored, scales, values = _stored(keys, fmt)
    search = ExactSearch(stored, similarity, scales)
    assert not search.rows.quantised or search.rows.packed.dtype == mx.uint32
    if not search.rows.quantised:
        assert search.rows.keys.dtype == stored.dtype  # never expanded to float32
    idx, dist = search(mx.array(queries), 3)
    ref = _reference(values, queries, similarity)
    got = np.take_along_axis(ref, np.array(idx).astype(np.int64), 1)
    best = np.sort(ref, 1)[:, ::-1][:, :3] if similarity == "cosine" else np.sort(ref, 1)[:, :3]
    # half-precision search rounds the query too: the neighbours are the reference's up to
    # that rounding; float32 and int8 (searched as 8-bit quantised rows) match closely
    tol = {"float32": 1e-3, "int8": 1e-3, "float16": 2e-2, "bfloat16": 1.5e-1}[fmt]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.sort(got, 1), np.sort(best, 1), atol=tol * scale)
    np.testing.assert_allclose(np.array(dist), got, atol=tol * scale)
    if fmt in ("float32", "int8"):  # the same neighbours as the reference
        order = np.argsort(-ref if similarity == "cosine" else ref, 1)[:, :3]
        assert (np.sort(np.array(idx), 1) == np.sort(order, 1)).all()


def test_int8_rows_are_the_stored_bytes():
    rng = np.random.default_rng(0)
    q, s = quantize_rows(rng.normal(size=(64, 96)).astype(np.float32))
    rows = KeyRows(mx.array(q), mx.array(s))
    # 8 bits per element (padded to 96 -> 96), no float copy of the keys
    assert rows.packed.nbytes == q.nbytes
    x = rng.normal(size=(3, 96)).astype(np.float32)
    np.testing.assert_allclose(
        np.array(rows.dots(mx.array(x))), x @ dequantize_rows(q, s).T, rtol=1e-4, atol=1e-3
    )


def test_fill_lists_respects_capacity_and_places_every_entry():
    rng = np.random.default_rng(0)
    choice = np.stack([np.zeros(50, int), rng.integers(0, 5, 50), rng.integers(0, 5, 50)], 1)
    dist = np.sort(rng.random((50, 3)), 1)
    lists = fill_lists(choice, dist, 5, 12)
    placed = lists[lists >= 0]
    assert sorted(placed.tolist()) == list(range(50))
    assert ((lists >= 0).sum(1) <= 12).all()
    # list 0 is everyone's first choice: it keeps its 12 nearest
    nearest = np.argsort(dist[:, 0], kind="stable")[:12]
    assert sorted(lists[0].tolist()) == sorted(nearest.tolist())


@pytest.fixture(scope="module")
def router_inputs(olmoe):
    """A memory of 1,536 router inputs per layer and 256 queries from other text."""
    memory = memory_from(olmoe, tokens(3, (24, 64)))
    queries = {layer: x for layer, (x, _) in captured(olmoe, tokens(4, (4, 64))).items()}
    return memory, queries


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_ivf_recall_against_exact_on_router_inputs(olmoe, router_inputs, fmt):
    memory, queries = router_inputs
    memory = convert_keys(memory, fmt)
    for layer in memory.layers:
        keys, scales = memory.keys[layer], memory.key_scales.get(layer)
        centroids, lists = train_ivf(mx.array(memory.dense_keys(layer)), nlist=16)
        assert centroids.shape == (16, keys.shape[1])
        assert sorted(np.array(lists)[np.array(lists) >= 0].tolist()) == list(range(1536))
        q = queries[layer]
        exact, exact_dist = ExactSearch(keys, "rbf", scales)(q, 1)
        everything = IvfSearch(keys, "rbf", centroids, lists, 16, scales)(q, 1)
        assert (np.array(everything[0]) == np.array(exact)).all()  # every list read: exact
        np.testing.assert_allclose(np.array(everything[1]), np.array(exact_dist), rtol=1e-4)
        idx, _ = IvfSearch(keys, "rbf", centroids, lists, 8, scales)(q, 1)
        assert (np.array(idx) == np.array(exact)).mean() >= 0.9


def test_ivf_index_round_trip_and_attach(tmp_path, olmoe, router_inputs):
    memory, queries = router_inputs
    small = convert_keys(project(memory, 32), "int8")
    small.ivf = {
        layer: train_ivf(mx.array(small.dense_keys(layer)), nlist=16) for layer in small.layers
    }
    back = Memory.load(small.save(tmp_path / "m.st"))
    assert back.version == 2
    for layer in small.layers:
        assert back.keys[layer].dtype == mx.int8  # int8 in RAM too
        for a, b in zip(back.ivf[layer], small.ivf[layer]):
            assert np.array_equal(np.array(a), np.array(b))
        block = moe_layers(olmoe)[layer]
        lm = LayerMemory.from_memory(back, layer, routing_map(spec_for(olmoe), block))
        full = KNNConfig(k=1, search="ivf", nprobe=16)
        exact = lm.retrieve(queries[layer], KNNConfig(k=1, search="exact"))[0]
        assert (np.array(lm.retrieve(queries[layer], full)[0]) == np.array(exact)).all()
        assert lm.ivf is back.ivf[layer]  # the stored index, not a retrained one
    assert back.nbytes() < memory.nbytes() / 3


def test_auto_measures_and_keeps_one_index(olmoe, router_inputs, monkeypatch):
    import mlx_knnmoe.retrieval.search as search

    memory, queries = router_inputs
    monkeypatch.setattr(search, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    layer = memory.layers[0]
    block = moe_layers(olmoe)[layer]
    lm = LayerMemory.from_memory(memory, layer, routing_map(spec_for(olmoe), block))
    lm.retrieve(queries[layer], KNNConfig(k=1, search="auto"))
    chosen = lm.chosen[("rbf", 8)]
    assert chosen in ("exact", "ivf")
    assert [k[0] for k in lm.searchers] == [chosen]
