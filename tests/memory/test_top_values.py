"""Values kept for the top-m experts only (memory/values.py): what the rebuilt rows keep,
the round trip through the file, the schema's errors, mixing against dense values, and
compress_memory --top-experts."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import KNNConfig, Memory, MemoryFormatError, attach
from mlx_knnmoe.arch.specs import moe_layers, routing_map, spec_for
from mlx_knnmoe.commands.compress_memory import cli
from mlx_knnmoe.memory.compress import compress, keep_top_experts
from mlx_knnmoe.memory.values import dense_values, top_values
from mlx_knnmoe.retrieval.attach import detach
from mlx_knnmoe.retrieval.layer_memory import LayerMemory
from mlx_knnmoe.retrieval.mixing import blend
from tests.helpers import memory_from, rewritten, tokens


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_rebuilt_rows_keep_stored_scores_and_the_missing_total():
    z = np.random.default_rng(0).normal(0, 2, (50, 16)).astype(np.float32)
    experts, top, rest = top_values(z, 4, "softmax")
    assert experts.dtype == np.uint8 and top.shape == (50, 4) and rest.shape == (50,)
    back = dense_values(experts, top, rest, 16)
    p, q = _softmax(z), _softmax(back)
    stored = np.zeros_like(z, bool)
    np.put_along_axis(stored, experts.astype(int), True, 1)
    np.testing.assert_allclose(q[stored], p[stored], rtol=1e-5)  # stored experts exact
    np.testing.assert_allclose((q * ~stored).sum(1), (p * ~stored).sum(1), rtol=1e-5)
    assert (np.sort(z, 1)[:, -4:] == np.sort(top, 1)).all()  # the top 4, exactly
    # the model's top-2 of the rebuilt row is the original's
    assert (np.sort(np.argsort(-back, 1)[:, :2], 1) == np.sort(np.argsort(-z, 1)[:, :2], 1)).all()
    # sigmoid routers: stored scores exact, the missing experts' total score exact
    e, t, r = top_values(z, 4, "sigmoid")
    s, sb = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-dense_values(e, t, r, 16)))
    np.testing.assert_allclose((sb * ~stored).sum(1), (s * ~stored).sum(1), rtol=1e-5)
    # where the missing logits are equal, the rebuilt row is the original
    flat = np.where(stored, z, -1.5).astype(np.float32)
    np.testing.assert_allclose(dense_values(*top_values(flat, 4, "softmax"), 16), flat, atol=1e-6)
    for bad in (0, 16, 2.5):
        with pytest.raises(ValueError, match=r"top experts must be an integer in \[1, 15\]"):
            top_values(z, bad, "softmax")


@pytest.fixture(scope="module")
def memory(olmoe):
    return memory_from(olmoe, tokens(0, (8, 64)))


def test_round_trip_and_size(tmp_path, memory):
    small = compress(memory, top_experts=4)
    back = Memory.load(small.save(tmp_path / "m.st"))
    assert back.version == 3 and back.compression["top_experts"] == 4
    stored = mx.load(str(tmp_path / "m.st"), format="safetensors")
    assert "layers.1.logits" not in stored
    assert stored["layers.1.top_experts"].dtype == mx.uint8
    assert stored["layers.1.top_logits"].dtype == mx.float16
    assert stored["layers.1.rest_logits"].shape == (memory.keys[1].shape[0],)
    for layer in memory.layers:
        dense = memory.dense_logits(layer)
        assert back.logits[layer].shape == (dense.shape[0], 4)  # never expanded in RAM
        want = dense_values(*top_values(dense, 4, "softmax"), 8)
        np.testing.assert_allclose(back.dense_logits(layer), want, atol=2e-2)  # float16
    rows = memory.keys[1].shape[0]  # float16 logits and rest, uint8 indices: 14 of 32 bytes
    value_bytes = back.logits[1].nbytes + back.top_experts[1].nbytes + back.rest_logits[1].nbytes
    assert value_bytes == rows * (4 * 2 + 4 + 2) and memory.logits[1].nbytes == rows * 32
    assert back.nbytes() == memory.nbytes() - len(memory.layers) * rows * (32 - 14)


def test_neighbour_logits_rebuild_only_the_rows_read(olmoe, memory):
    small = compress(memory, top_experts=3, values="float32")
    rmap = routing_map(spec_for(olmoe), moe_layers(olmoe)[1])
    lm = LayerMemory.from_memory(small, 1, rmap)
    idx = mx.array([[0, 5], [7, 7]])
    got = np.array(lm.neighbour_logits(idx))
    want = small.dense_logits(1)[np.array(idx)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    rebuilt = {layer: mx.array(small.dense_logits(layer)) for layer in small.layers}
    dense = LayerMemory.from_memory(Memory(small.keys, rebuilt, small.fingerprint), 1, rmap)
    for a, b in zip(lm.assignment(), dense.assignment()):
        np.testing.assert_allclose(np.sort(np.array(a), -1), np.sort(np.array(b), -1), rtol=1e-6)


def test_mixing_equals_dense_values_where_the_top_experts_are_all_that_matter(olmoe, memory):
    """Logits whose experts outside the top 3 are equal: top-3 values lose nothing, so the
    model's output with them is the dense memory's."""
    flat = {}
    for layer, z in memory.logits.items():
        z = np.array(z)
        third = np.sort(z, 1)[:, -3][:, None]
        flat[layer] = mx.array(np.where(z >= third, z, z.min() - 1.0))
    dense = Memory(memory.keys, flat, memory.fingerprint)
    small = compress(dense, top_experts=3, values="float32")
    toks = tokens(1, (2, 16))
    out = []
    for mem in (dense, small):
        attach(olmoe, mem, KNNConfig(search="exact", k=2))
        out.append(np.array(olmoe(toks)))
        detach(olmoe)
    np.testing.assert_allclose(out[1], out[0], atol=1e-4)


def test_topk_blend_is_off_by_at_most_lambda_times_the_largest_missing_score(olmoe, memory):
    rmap = routing_map(spec_for(olmoe), moe_layers(olmoe)[1])
    small = compress(memory, top_experts=3, values="float32")
    lm, full = LayerMemory.from_memory(small, 1, rmap), LayerMemory.from_memory(memory, 1, rmap)
    rng = np.random.default_rng(2)
    idx = mx.array(rng.integers(0, memory.keys[1].shape[0], (64, 2)))
    w = mx.array(rng.dirichlet([1, 1], 64).astype(np.float32))
    lam = mx.array(rng.uniform(0, 1, 64).astype(np.float32))
    own = rmap.scores(mx.array(rng.normal(0, 1, (64, 8)).astype(np.float32)))
    got = np.array(blend(own, lam, w, lm.neighbour_scores(idx)))
    want = np.array(blend(own, lam, w, full.neighbour_scores(idx)))
    p = np.array(full.neighbour_scores(idx))  # [T, K, N]
    third = np.sort(p, -1)[..., -3:-2]
    largest_missing = np.where(p < third, p, 0).max(-1).max(-1)  # over experts and neighbours
    assert (np.abs(got - want).max(-1) <= np.array(lam) * largest_missing + 1e-6).all()


def _saved(tmp_path, memory, m=4):
    return compress(memory, top_experts=m).save(tmp_path / "top.st")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: {"layers.1.top_experts": a["layers.1.top_experts"] + 8},
            r"'layers.1.top_experts': expected valid values, found 'expert indices in 0..7",
        ),
        (
            lambda a: {"layers.1.top_experts": mx.zeros_like(a["layers.1.top_experts"])},
            r"'layers.1.top_experts': expected valid values, found 'distinct experts",
        ),
        (
            lambda a: {"layers.1.top_experts": a["layers.1.top_experts"].astype(mx.int32)},
            r"'layers.1.top_experts': expected dtype uint8 or int16, found 'int32'",
        ),
        (
            lambda a: {"layers.1.rest_logits": None},
            r"'layers.1.top_logits': expected 'layers.1.rest_logits' with it, found none",
        ),
        (
            lambda a: {"layers.1.logits": mx.zeros((a["layers.1.keys"].shape[0], 8))},
            r"'layers.1.top_logits': expected either it or 'layers.1.logits', not both",
        ),
        (
            lambda a: {"layers.1.top_logits": None},
            r"layer 1: expected a tensor 'layers.1.logits', found none",
        ),
        (
            lambda a: {"layers.1.top_experts": a["layers.1.top_experts"][:, :3]},
            r"'layers.1.top_experts': expected shape \[M, m\] with M=\d+ .*m=4",
        ),
    ],
)
def test_schema_errors(tmp_path, memory, change, message):
    src = _saved(tmp_path, memory)
    arrays = mx.load(str(src), format="safetensors")
    bad = rewritten(src, tmp_path / "bad.st", change(arrays))
    with pytest.raises(MemoryFormatError, match=message):
        Memory.load(bad)


def test_top_values_on_a_top_values_memory_and_pruning(olmoe, memory):
    four = keep_top_experts(memory, 4, "float32")
    two = keep_top_experts(four, 2, "float32")
    assert two.logits[1].shape[1] == 2 and two.compression["top_experts"] == 2
    n = memory.keys[1].shape[0]
    bumped = {  # every other entry's logits favour expert 3: those disagree with the router
        layer: mx.where((mx.arange(n) % 2 == 1)[:, None], z + 6.0 * (mx.arange(8) == 3), z)
        for layer, z in memory.logits.items()
    }
    pruned = compress(
        keep_top_experts(Memory(memory.keys, bumped, memory.fingerprint), 4, "float32"),
        prune=True,
        model=olmoe,
    )
    assert 0 < pruned.keys[1].shape[0] < n
    for layer in pruned.layers:
        assert pruned.top_experts[layer].shape == pruned.logits[layer].shape
        assert pruned.rest_logits[layer].shape[0] == pruned.keys[layer].shape[0]


def test_compress_memory_cli(tmp_path, memory):
    src = memory.save(tmp_path / "m.st")
    result = CliRunner().invoke(cli, [str(src), str(tmp_path / "o.st"), "--top-experts", "2"])
    assert result.exit_code == 0, result.output
    assert Memory.load(tmp_path / "o.st").logits[1].shape[1] == 2
    result = CliRunner().invoke(cli, [str(src), str(tmp_path / "p.st"), "--top-experts", "8"])
    assert result.exit_code != 0 and "top experts must be an integer in [1, 7]" in result.output
    assert "Traceback" not in result.output


def test_the_pytorch_companion_reads_top_expert_values(tmp_path, memory):
    torch = pytest.importorskip("torch")
    from mlx_knnmoe.pytorch.store import Memory as TorchMemory

    path = _saved(tmp_path, memory)
    theirs = TorchMemory.load(path)
    assert theirs.top_experts[1].dtype == torch.uint8
    np.testing.assert_array_equal(theirs.dense_logits(1), Memory.load(path).dense_logits(1))
