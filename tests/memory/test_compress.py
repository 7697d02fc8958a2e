"""Memory compression: round trips through the file, the effect on exact-search neighbours of
router inputs captured from a model, pruning, the probe, and mlx_knnmoe.compress_memory."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import KNNConfig, Memory, MemoryMismatchError, attach
from mlx_knnmoe.arch.specs import moe_layers, routing_map, spec_for
from mlx_knnmoe.commands.compress_memory import cli
from mlx_knnmoe.memory.bandwidth import calibrate_bandwidth
from mlx_knnmoe.memory.compress import compress, convert_keys, project, prune_agreeing
from mlx_knnmoe.memory.validation import validate_for_model
from mlx_knnmoe.retrieval.attach import detach, knn_stats, set_stats
from mlx_knnmoe.retrieval.layer_memory import LayerMemory
from tests.helpers import captured, memory_from, refused, tokens
from tests.tiny_models import make_tiny_model_dir, tiny_model


@pytest.fixture(scope="module")
def memory(olmoe):
    """1024 entries per layer; every other entry's logits favour expert 3 (a correction)."""
    mem = memory_from(olmoe, tokens(0, (16, 64)))
    rows = (mx.arange(1024) % 2 == 1)[:, None]
    bump = 6.0 * (mx.arange(8) == 3)
    logits = {layer: mx.where(rows, z + bump, z) for layer, z in mem.logits.items()}
    return Memory(mem.keys, logits, mem.fingerprint)


@pytest.fixture(scope="module")
def queries(olmoe):
    return {layer: x for layer, (x, _) in captured(olmoe, tokens(1, (4, 64))).items()}


def neighbours(olmoe, memory, queries, layer, k=1):
    block = moe_layers(olmoe)[layer]
    lm = LayerMemory.from_memory(memory, layer, routing_map(spec_for(olmoe), block))
    idx, _, lam = lm.retrieve(queries[layer], KNNConfig(k=k, search="exact"))
    return np.array(idx), np.array(lam)


def top1_agreement(olmoe, a, b, queries, layer):
    return float(
        (neighbours(olmoe, a, queries, layer)[0] == neighbours(olmoe, b, queries, layer)[0]).mean()
    )


@pytest.mark.parametrize(
    "options, version",
    [
        ({"keys": "float16"}, 1),
        ({"keys": "int8"}, 2),
        ({"pca": 16}, 2),
        ({"pca": 24, "keys": "int8"}, 2),
    ],
)
def test_round_trip(tmp_path, memory, options, version):
    small = compress(memory, **options)
    back = Memory.load(small.save(tmp_path / "m.st"))
    assert back.version == version and back.compression == small.compression
    for layer in memory.layers:
        np.testing.assert_allclose(
            np.array(back.keys[layer]), np.array(small.keys[layer]), rtol=1e-6
        )
        assert np.array_equal(np.array(back.logits[layer]), np.array(memory.logits[layer]))
        assert back.bandwidth[layer] == pytest.approx(small.bandwidth[layer])
        if "pca" in options:
            assert back.keys[layer].shape == (1024, options["pca"])
            assert back.projection[layer].shape == (options["pca"], 64)
    stored = mx.load(str(tmp_path / "m.st"), format="safetensors")
    if options.get("keys") == "int8":
        assert stored["layers.1.keys"].dtype == mx.int8 and stored["layers.1.key_scales"].shape == (
            1024,
        )
    assert (tmp_path / "m.st").stat().st_size < 0.85 * memory.save(
        tmp_path / "full.st"
    ).stat().st_size


def test_float16_keeps_neighbours(olmoe, memory, queries):
    # keys of bfloat16 models (the usual case) are exact in float16; search runs in the keys'
    # own dtype, so the query's rounding moves a few near ties
    bf16 = convert_keys(memory, "bfloat16")
    f16 = convert_keys(bf16, "float16")
    for layer in memory.layers:
        assert f16.keys[layer].dtype == mx.float16
        np.testing.assert_allclose(f16.dense_keys(layer), bf16.dense_keys(layer), atol=1e-4)
    for layer in memory.layers:
        assert top1_agreement(olmoe, bf16, f16, queries, layer) > 0.95
        assert top1_agreement(olmoe, memory, f16, queries, layer) > 0.95


def test_int8_keeps_nearly_all_neighbours(olmoe, memory, queries):
    int8 = convert_keys(memory, "int8")
    for layer in memory.layers:
        assert top1_agreement(olmoe, memory, int8, queries, layer) > 0.95
        np.testing.assert_allclose(
            neighbours(olmoe, int8, queries, layer)[1],
            neighbours(olmoe, memory, queries, layer)[1],
            atol=0.01,
        )


def test_pca_recall_is_measured_and_grows_with_dim(olmoe, memory, queries):
    exact = {layer: neighbours(olmoe, memory, queries, layer)[0] for layer in memory.layers}
    recall = {}
    for dim in (8, 16, 32, 48):
        small = project(memory, dim)
        found = [neighbours(olmoe, small, queries, layer)[0] == exact[layer] for layer in exact]
        recall[dim] = float(np.mean(found))
    print("PCA recall@1 of exact neighbours:", {d: round(r, 3) for d, r in recall.items()})
    assert recall[8] < recall[16] < recall[32] < recall[48]
    assert recall[48] > 0.7  # random tiny models have nearly isotropic router inputs


def test_pca_memory_searches_with_hnsw_too(olmoe, memory, queries):
    small = project(memory, 32)
    block = moe_layers(olmoe)[1]
    lm = LayerMemory.from_memory(small, 1, routing_map(spec_for(olmoe), block))
    exact, _, _ = lm.retrieve(queries[1], KNNConfig(k=1, search="exact"))
    approx, _, _ = lm.retrieve(queries[1], KNNConfig(k=1, search="hnsw"))
    assert (np.array(exact) == np.array(approx)).mean() > 0.95


def test_bandwidth_ignores_duplicate_keys(olmoe, memory, queries):
    # templated data repeats prefixes: the same router inputs again, up to rounding
    keys = memory.keys[1]
    repeated = mx.concatenate([keys, keys * (1 + 1e-7), keys])
    tau = calibrate_bandwidth(repeated)
    assert tau == pytest.approx(calibrate_bandwidth(keys), rel=0.1)
    logits = mx.concatenate([memory.logits[1]] * 3)
    full = Memory({1: repeated}, {1: logits}, memory.fingerprint)
    lam = neighbours(olmoe, full, queries, 1)[1]
    assert lam.mean() > 0.05
    np.testing.assert_allclose(
        neighbours(olmoe, convert_keys(full, "int8"), queries, 1)[1], lam, atol=0.01
    )


def test_pca_basis_keeps_the_mean_and_is_orthonormal(memory):
    small = project(memory, 16)
    for layer in memory.layers:
        p = np.array(small.projection[layer])
        np.testing.assert_allclose(p @ p.T, np.eye(16), atol=1e-5)
        mean = np.array(memory.keys[layer]).mean(0)
        np.testing.assert_allclose(np.linalg.norm(p @ mean), np.linalg.norm(mean), rtol=1e-4)
        kept = small.compression["pca"]["variance_kept"][str(layer)]
        assert 0 < kept < 1
    twice = project(small, 8)  # projecting again composes the projections
    assert twice.projection[1].shape == (8, 64)
    for bad in (64, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"PCA dim must be an integer in \[1, 63\]"):
            project(memory, bad)


def test_pca_memory_refuses_a_model_of_another_width(memory):
    small = project(memory, 16)
    wide = tiny_model("olmoe", hidden_size=128, head_dim=32)
    with pytest.raises(
        MemoryMismatchError, match="layer 0: projection takes dim 64, model hidden_size is 128"
    ):
        validate_for_model(small, wide)


def test_pca_memory_attaches_and_retrieves(olmoe, memory):
    attach(olmoe, project(memory, 32), KNNConfig(k=1, search="exact"))
    try:
        set_stats(olmoe)
        mx.eval(olmoe(tokens(0, (2, 16))))  # keys of the memory itself: lambda is high
        assert all(s["mean_lambda"] > 0.2 for s in knn_stats(olmoe).values())
    finally:
        detach(olmoe)


def test_prune_drops_entries_the_router_agrees_with(olmoe, memory):
    pruned = prune_agreeing(memory, olmoe)
    for layer in memory.layers:
        n = pruned.num_entries()[layer]
        assert 0 < n <= 512 and pruned.compression["prune"]["removed"][str(layer)] == 1024 - n
        assert pruned.bandwidth[layer] == memory.bandwidth[layer]
    with pytest.raises(MemoryMismatchError, match="pruning compares with the router"):
        prune_agreeing(memory, tiny_model("olmoe", seed=1))
    with pytest.raises(ValueError, match="every entry agrees with the router"):
        prune_agreeing(memory_from(olmoe, tokens(3)), olmoe)
    with pytest.raises(ValueError, match="prune before projecting"):
        prune_agreeing(project(memory, 16), olmoe)
    with pytest.raises(ValueError, match="pruning needs the model"):
        compress(memory, prune=True)


def test_compress_with_the_model_adds_a_probe(olmoe, memory):
    small = compress(memory, pca=16, keys="int8", model=olmoe)
    assert sorted(small.probe) == memory.layers and small.probe[1][0].shape == (64, 64)
    other = tiny_model("olmoe", seed=1)
    with pytest.warns(UserWarning, match=r"same top-2 experts for \d+\.\d% of them"):
        validate_for_model(small, other)


def test_format_errors(tmp_path, memory, olmoe):
    good = compress(memory, keys="int8").save(tmp_path / "good.st")
    no_scales = {"layers.0.key_scales": None}
    message = r"tensor 'layers.0.keys': expected a dtype other than int8 without "
    refused(good, tmp_path / "a.st", message + r"'layers.0.key_scales', found 'int8'", no_scales)
    scales = {"layers.0.key_scales": mx.ones((3,))}
    refused(good, tmp_path / "s.st", r"'layers.0.key_scales': expected shape \[M\]", scales)
    pca = compress(memory, pca=16).save(tmp_path / "pca.st")
    message = r"tensor 'layers.0.projection': expected shape \[d, D\] with d=16 "
    message += r"\(from layers.0.keys\), found \(6, 64\)"
    refused(pca, tmp_path / "b.st", message, {"layers.0.projection": mx.zeros((6, 64))})
    probe = compress(memory, pca=16, model=olmoe).save(tmp_path / "probe.st")
    message = r"tensor 'layers.0.probe_keys': expected 'layers.0.probe_logits' with it, found none"
    refused(probe, tmp_path / "c.st", message, {"layers.0.probe_logits": None})


def test_memory_command(tmp_path):
    from mlx_lm import load

    model_dir = make_tiny_model_dir(tmp_path / "olmoe", "olmoe")
    olmoe = load(str(model_dir))[0]
    source = memory_from(olmoe, tokens(0, (8, 32)), lambda z: z + 5.0 * (mx.arange(8) == 2))
    source.save(model_dir / "memories" / "med.st")
    out = tmp_path / "small.st"
    args = [
        "med",
        str(out),
        "--keys",
        "int8",
        "--pca",
        "32",
        "--prune",
        "--model",
        str(model_dir),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "MB ->" in result.output and "PCA 32 dims keep" in result.output
    assert "layer 1: 256 -> " in result.output
    small = Memory.load(out)
    assert small.compression["keys"] == "int8" and small.probe
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "exists; pass --force" in result.output
    result = CliRunner().invoke(cli, ["med", str(tmp_path / "x.st"), "--prune"])
    assert result.exit_code == 2 and "--prune needs --model" in result.output
