"""The memory file: round trip, atomic writes, and every validation error."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import Memory, MemoryFormatError, MemoryMismatchError, attach
from mlx_knnmoe.memory.bandwidth import calibrate_bandwidth
from tests.helpers import memory_from, refused, tokens
from tests.tiny_models import tiny_model


@pytest.fixture
def memory(olmoe):
    mem = memory_from(olmoe, tokens(0))
    mem.build = {"eta": 1.5, "steps": 1}
    mem.retrieval = {"k": 3, "mix": "union"}
    return mem


def test_round_trip(tmp_path, memory):
    path = memory.save(tmp_path / "med.st")
    back = Memory.load(path)
    assert back.layers == memory.layers
    for layer in memory.layers:
        assert np.array_equal(np.array(back.keys[layer]), np.array(memory.keys[layer]))
        assert np.array_equal(np.array(back.logits[layer]), np.array(memory.logits[layer]))
        assert back.bandwidth[layer] == pytest.approx(memory.bandwidth[layer])
    assert back.fingerprint == memory.fingerprint
    assert back.build == memory.build and back.retrieval == memory.retrieval
    assert back.path == path


def test_file_is_self_describing(tmp_path, memory):
    path = memory.save(tmp_path / "m.st")
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    assert meta["format"] == "mlx_knnmoe.memory" and meta["version"] == "1"
    fp = json.loads(meta["fingerprint"])
    assert fp["model_type"] == "olmoe" and fp["moe_layers"] == [0, 1, 2]
    assert set(json.loads(meta["bandwidth"])) == {"0", "1", "2"}
    assert arrays["layers.1.keys"].shape == (24, 64) and arrays["layers.1.logits"].shape == (24, 8)


def test_load_subset_of_layers(tmp_path, memory):
    path = memory.save(tmp_path / "m.st")
    assert Memory.load(path, layers=[2]).layers == [2]
    with pytest.raises(MemoryMismatchError, match=r"asked for layers \[7\]"):
        Memory.load(path, layers=[7])


def test_never_overwrites_without_force(tmp_path, memory):
    path = tmp_path / "m.st"
    path.write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        memory.save(path)
    assert path.read_text() == "user data"
    memory.save(path, force=True)
    assert Memory.load(path).layers == memory.layers
    assert [p.name for p in tmp_path.iterdir()] == ["m.st"]  # no temporary left behind


def test_refuses_a_name_mlx_lm_would_load_as_weights(tmp_path, memory):
    with pytest.raises(ValueError, match="model\\*.safetensors"):
        memory.save(tmp_path / "model-00001.safetensors")


def test_format_errors(tmp_path, memory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Memory.load(tmp_path / "missing.st")
    bad = tmp_path / "bad.st"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryFormatError, match="not a readable safetensors"):
        Memory.load(bad)
    other = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(other), {"w": mx.zeros(2)}, metadata={"format": "mlx"})
    with pytest.raises(MemoryFormatError, match="'format' is 'mlx', expected 'mlx_knnmoe.memory'"):
        Memory.load(other)
    good = memory.save(tmp_path / "good.st")
    message = r"shape.st: tensor 'layers.0.logits': expected shape \[M, N\] with M=24 "
    message += r"\(from layers.0.keys\), found \(5, 8\)"
    refused(good, tmp_path / "shape.st", message, {"layers.0.logits": mx.zeros((5, 8))})
    refused(good, tmp_path / "v.st", "'version' is '9'", version="9")
    refused(good, tmp_path / "j.st", "'fingerprint' is not valid JSON", fingerprint="{broken")
    with pytest.raises(MemoryFormatError, match=r"keys \[0\] differ from layers with logits \[\]"):
        Memory({0: mx.zeros((2, 4))}, {}, {})


def test_validation_names_each_difference(olmoe, memory):
    def altered(**changes):
        fp = dict(memory.fingerprint, **changes)
        return Memory(memory.keys, memory.logits, fp, bandwidth=memory.bandwidth)

    with pytest.raises(
        MemoryMismatchError, match="model_type: memory has 'mixtral', model has 'olmoe'"
    ):
        attach(olmoe, altered(model_type="mixtral"))
    with pytest.raises(MemoryMismatchError, match="num_experts: memory has 16, model has 8"):
        attach(olmoe, altered(num_experts=16))
    with pytest.raises(MemoryMismatchError, match="hidden_size: memory has 128, model has 64"):
        attach(olmoe, altered(hidden_size=128))
    wrong_dim = Memory({0: mx.zeros((3, 32))}, {0: mx.zeros((3, 8))}, memory.fingerprint)
    with pytest.raises(
        MemoryMismatchError, match="layer 0: keys have dim 32, model hidden_size is 64"
    ):
        attach(olmoe, wrong_dim)
    wrong_n = Memory({0: mx.zeros((3, 64))}, {0: mx.zeros((3, 6))}, memory.fingerprint)
    with pytest.raises(MemoryMismatchError, match="layer 0: logits have 6 experts, model has 8"):
        attach(olmoe, wrong_n)
    extra = Memory({9: mx.zeros((3, 64))}, {9: mx.zeros((3, 8))}, memory.fingerprint)
    with pytest.raises(MemoryMismatchError, match=r"layers \[9\] are not MoE layers"):
        attach(olmoe, extra)
    deepseek = tiny_model("deepseek_v3")  # layer 0 is dense there
    fp = dict(memory.fingerprint, model_type="deepseek_v3")
    with pytest.raises(MemoryMismatchError, match=r"layers \[0\] are not MoE layers"):
        attach(deepseek, Memory(memory.keys, memory.logits, fp))


def test_validation_warns_on_router_differences(olmoe, memory):
    other = tiny_model("olmoe", seed=1)
    with pytest.warns(UserWarning, match=r"router weights differ .* layers \[0, 1, 2\]"):
        attach(other, memory)
    topk = Memory(memory.keys, memory.logits, dict(memory.fingerprint, top_k=4))
    with pytest.warns(UserWarning, match="top_k: memory built with 4, model uses 2"):
        attach(olmoe, topk)


def test_bandwidth_is_median_nearest_neighbour_distance():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 8)).astype(np.float32)
    d2 = ((keys[:, None] - keys[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert calibrate_bandwidth(mx.array(keys)) == pytest.approx(np.median(d2.min(1)), rel=1e-4)
    assert calibrate_bandwidth(mx.zeros((1, 8))) == 1.0
