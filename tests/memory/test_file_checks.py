"""The one validation every memory load runs (memory/file_format.py): metadata schema, strict
tensor names, dtypes, shapes, values, content hashes; each failure names file, field, expected
and found."""

import json
import os
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import Memory, MemoryFormatError
from mlx_knnmoe.memory import schema
from mlx_knnmoe.memory.schema import HASH_FIELD, TensorRule, check_tensors
from tests.helpers import memory_from, rewritten, tokens


@pytest.fixture(scope="module")
def good(olmoe, tmp_path_factory):
    memory = memory_from(olmoe, tokens(0))
    memory.retrieval = {"k": 1, "mix": "topk"}
    return memory.save(tmp_path_factory.mktemp("good") / "good.st")


def meta_of(path) -> dict:
    return mx.load(str(path), format="safetensors", return_metadata=True)[1]


def json_meta(path, name: str, change) -> dict:
    """{name: the JSON metadata field ``name`` of ``path`` after ``change(value)``}."""
    value = json.loads(meta_of(path)[name])
    return {name: json.dumps(change(value))}


def with_keys(value):
    def change(d):
        d["0"] = value
        return d

    return change


def fingerprint_with(field, value):
    def change(fp):
        if value is _DROP:
            del fp[field]
        else:
            fp[field] = value
        return fp

    return change


_DROP = object()
NAN_KEYS = np.full((24, 64), np.nan, np.float32)

# (case, tensor changes, metadata changes as (field, change), expected message)
TENSOR_CASES = [
    ("nan keys", {"layers.0.keys": mx.array(NAN_KEYS)}, r"'layers.0.keys': expected finite"),
    (
        "inf logits",
        {"layers.1.logits": mx.full((24, 8), float("inf"))},
        r"'layers.1.logits': expected finite values, found 192 NaN or infinite values",
    ),
    (
        "int32 logits",
        {"layers.0.logits": mx.zeros((24, 8), mx.int32)},
        r"'layers.0.logits': expected dtype float32 or float16 or bfloat16, found 'int32'",
    ),
    (
        "empty layer",
        {"layers.0.keys": mx.zeros((0, 64)), "layers.0.logits": mx.zeros((0, 8))},
        r"'layers.0.keys': expected at least 1 along M, found \(0, 64\)",
    ),
    (
        "leading zero",
        {"layers.00.keys": mx.zeros((24, 64))},
        r"tensor 'layers.00.keys': expected a name layers.<layer number>.<field>",
    ),
    (
        "unicode digit",
        {"layers.\u0661.keys": mx.zeros((24, 64))},
        r"tensor 'layers.\u0661.keys': expected a name layers.<layer number>",
    ),
    (
        "unknown field",
        {"layers.0.values": mx.zeros((24, 8))},
        r"tensor 'layers.0.values': expected a field among keys, logits, key_scales",
    ),
    ("other tensor", {"weights": mx.zeros(3)}, r"tensor 'weights': expected a name layers"),
    (
        "experts differ from the fingerprint",
        {"layers.0.logits": mx.zeros((24, 6))},
        r"'layers.0.logits': expected N = fingerprint.num_experts = 8, found N = 6",
    ),
    (
        "key dim differs from the fingerprint",
        {"layers.0.keys": mx.zeros((24, 32))},
        r"'layers.0.keys': expected D = fingerprint.hidden_size = 64, found D = 32",
    ),
    (
        "missing logits",
        {"layers.2.logits": None},
        r"layer 2: expected a tensor 'layers.2.logits', found none",
    ),
    (
        "1-d keys",
        {"layers.0.keys": mx.zeros((24,))},
        r"'layers.0.keys': expected shape \[M, d\], found \(24,\)",
    ),
    (
        "a layer not in the fingerprint",
        {"layers.7.keys": mx.zeros((2, 64)), "layers.7.logits": mx.zeros((2, 8))},
        r"tensors of layer 7: expected a layer in fingerprint.moe_layers, found \[0, 1, 2\]",
    ),
]

META_CASES = [
    ("bandwidth 0", "bandwidth", with_keys(0.0), r"'bandwidth.0': expected a finite number > 0"),
    ("bandwidth -1", "bandwidth", with_keys(-1.0), r"'bandwidth.0': .*found -1.0"),
    ("bandwidth nan", "bandwidth", with_keys(float("nan")), r"'bandwidth.0': .*found nan"),
    ("bandwidth inf", "bandwidth", with_keys(float("inf")), r"'bandwidth.0': .*found inf"),
    ("bandwidth list", "bandwidth", with_keys([1.0]), r"'bandwidth.0': .*found \[1.0\]"),
    ("bandwidth true", "bandwidth", with_keys(True), r"'bandwidth.0': .*found True"),
    ("bandwidth not a dict", "bandwidth", lambda v: [1.0], r"'bandwidth': expected a JSON obj"),
    (
        "missing layer",
        "bandwidth",
        lambda v: {k: t for k, t in v.items() if k != "1"},
        r"metadata 'bandwidth': expected an entry for memorised layer 1, found none",
    ),
    (
        "extra layer",
        "bandwidth",
        lambda v: {**v, "5": 1.0},
        r"'bandwidth': expected entries for the memorised layers \[0, 1, 2\] only, "
        r"found entries for layers \[5\]",
    ),
    ("fingerprint null", "fingerprint", lambda v: None, r"'fingerprint': expected a JSON object"),
    ("retrieval null", "retrieval", lambda v: None, r"'retrieval': expected a JSON object"),
    (
        "retrieval k 2.5",
        "retrieval",
        lambda v: {**v, "k": 2.5},
        r"metadata 'retrieval': k must be an integer >= 1, got 2.5",
    ),
    (
        "retrieval lambda nan",
        "retrieval",
        lambda v: {**v, "lambda_scale": float("nan")},
        r"'retrieval': lambda_scale must be finite",
    ),
    (
        "hidden size string",
        "fingerprint",
        fingerprint_with("hidden_size", "64"),
        r"'fingerprint.hidden_size': expected an integer >= 1, found '64'",
    ),
    (
        "no router hash",
        "fingerprint",
        fingerprint_with("router_hash", _DROP),
        r"'fingerprint.router_hash': expected an object .*, found none",
    ),
    (
        "router hash missing a layer",
        "fingerprint",
        fingerprint_with("router_hash", {"0": "a", "1": "b"}),
        r"'fingerprint.router_hash': expected an entry for memorised layer 2",
    ),
    (
        "top_k above experts",
        "fingerprint",
        fingerprint_with("top_k", 9),
        r"'fingerprint.top_k': expected at most num_experts \(8\), found 9",
    ),
    (
        "build eta nan",
        "build",
        lambda v: {**v, "eta": float("nan")},
        r"'build.eta': expected a finite number > 0 or null, found nan",
    ),
    (
        "build config eta inf",
        "build",
        lambda v: {**v, "config": {"eta": float("inf")}},
        r"'build.config': eta must be finite and > 0, got inf",
    ),
    (
        "compression keys",
        "compression",
        lambda v: {"keys": "int4"},
        r"'compression.keys': expected float32 or float16 or bfloat16 or int8, found 'int4'",
    ),
]


@pytest.mark.parametrize("case, tensors, message", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensor_errors_name_file_tensor_expected_and_found(tmp_path, good, case, tensors, message):
    bad = rewritten(good, tmp_path / "bad.st", tensors)
    with pytest.raises(MemoryFormatError, match=r"bad.st: " if "layer" in message else "") as e:
        Memory.load(bad)
    assert __import__("re").search(message, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, field, change, message", META_CASES, ids=[c[0] for c in META_CASES])
def test_metadata_errors_name_file_field_expected_and_found(
    tmp_path, good, case, field, change, message
):
    bad = rewritten(good, tmp_path / "bad.st", meta=json_meta(good, field, change))
    with pytest.raises(MemoryFormatError, match=r"bad.st: .*" + message):
        Memory.load(bad)


def test_deeply_nested_json_is_a_format_error(tmp_path, good):
    deep = "[" * 100_000 + "]" * 100_000
    bad = rewritten(good, tmp_path / "bad.st", meta={"build": deep})
    with pytest.raises(MemoryFormatError, match="bad.st: metadata 'build' is nested too deeply"):
        Memory.load(bad)


def test_hashes_name_the_changed_tensor_and_catch_changed_metadata(tmp_path, good):
    arrays = mx.load(str(good), format="safetensors")
    flipped = np.array(arrays["layers.1.logits"])
    flipped[3, 2] += 0.5  # a plausible value: no schema can tell
    bad = rewritten(good, tmp_path / "t.st", {"layers.1.logits": mx.array(flipped)}, rehash=False)
    with pytest.raises(
        MemoryFormatError, match=r"t.st: tensor 'layers.1.logits' does not match its sha256"
    ):
        Memory.load(bad)
    tau = json_meta(good, "bandwidth", lambda v: {**v, "0": v["0"] * 2})
    bad = rewritten(good, tmp_path / "m.st", meta=tau, rehash=False)
    with pytest.raises(MemoryFormatError, match=r"m.st: metadata does not match its sha256"):
        Memory.load(bad)
    # the file's own bytes: flip one byte of the tensor data region
    raw = bytearray(good.read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "b.st").write_bytes(raw)
    with pytest.raises(MemoryFormatError, match=r"b.st: tensor 'layers.\d.\w+' does not match"):
        Memory.load(tmp_path / "b.st")


def test_a_file_without_hashes_loads_with_a_note(tmp_path, good):
    old = rewritten(good, tmp_path / "old.st", meta={HASH_FIELD: None})
    with pytest.warns(UserWarning, match=r"old.st: no content hashes .*loaded unverified"):
        back = Memory.load(old)
    assert back.layers == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Memory.load(good)  # a current file: no note


def test_saving_refuses_what_loading_would(olmoe, tmp_path):
    memory = memory_from(olmoe, tokens(0))
    memory.logits[1] = mx.full(memory.logits[1].shape, float("nan"))
    with pytest.raises(MemoryFormatError, match=r"refusing to write .*x.st: tensor 'layers.1.l"):
        memory.save(tmp_path / "x.st")
    memory = memory_from(olmoe, tokens(0))
    memory.bandwidth[0] = 0.0
    with pytest.raises(MemoryFormatError, match=r"refusing to write .*'bandwidth.0'"):
        memory.save(tmp_path / "x.st")
    assert not any(tmp_path.iterdir())


def test_a_fifo_or_directory_is_refused(tmp_path):
    fifo = tmp_path / "pipe.st"
    os.mkfifo(fifo)
    with pytest.raises(MemoryFormatError, match=r"pipe.st: expected a memory file, found a FIFO"):
        Memory.load(fifo)
    with pytest.raises(MemoryFormatError, match=r"expected a memory file, found a directory"):
        Memory.load(tmp_path)


def test_a_new_tensor_field_is_one_table_entry(monkeypatch):
    """How compact memories add a field: one TensorRule; sizes shared with the other fields
    ("C+1": one more than a size another tensor fixed) and value checks come with it."""
    rules = dict(schema.TENSOR_RULES)
    rules["centroids"] = TensorRule(("C", "d"), binds=("C",))
    rules["list_offsets"] = TensorRule(
        ("C+1",),
        ("int32",),
        needs=("centroids",),
        check=lambda x, dims: None if x[-1] == dims["M"] else f"last offset {x[-1]}",
    )
    monkeypatch.setattr(schema, "TENSOR_RULES", rules)

    def check(**extra):
        tensors = {"keys": {0: np.zeros((6, 4), np.float32)}, "logits": {0: np.zeros((6, 3))}}
        tensors["logits"][0] = tensors["logits"][0].astype(np.float32)
        tensors.update({k: {0: v} for k, v in extra.items()})
        check_tensors("f.st", tensors, lambda x: str(x.dtype), lambda x: x)

    centroids = np.zeros((2, 4), np.float32)
    check(centroids=centroids, list_offsets=np.array([0, 3, 6], np.int32))
    with pytest.raises(
        MemoryFormatError, match=r"'layers.0.list_offsets': expected shape \[C\+1\]"
    ):
        check(centroids=centroids, list_offsets=np.array([0, 6], np.int32))
    with pytest.raises(MemoryFormatError, match=r"expected valid values, found 'last offset 5'"):
        check(centroids=centroids, list_offsets=np.array([0, 3, 5], np.int32))
    with pytest.raises(MemoryFormatError, match=r"'layers.0.centroids': expected shape \[C, d\]"):
        check(centroids=np.zeros((2, 5), np.float32))
    with pytest.raises(MemoryFormatError, match=r"expected 'layers.0.centroids' with it"):
        check(list_offsets=np.array([0, 6], np.int32))


def test_the_pytorch_side_runs_the_same_checks(tmp_path, good):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from mlx_knnmoe.pytorch import Memory as TorchMemory

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLX's hashes verify in torch, and the other way
        back = TorchMemory.load(good)
        half = mx.load(str(good), format="safetensors")["layers.0.keys"].astype(mx.bfloat16)
        bf16 = rewritten(good, tmp_path / "bf16.st", {"layers.0.keys": half})
        assert TorchMemory.load(bf16).keys[0].dtype.is_floating_point
        Memory.load(back.save(tmp_path / "torch.st"))
    bad = rewritten(good, tmp_path / "bad.st", {"layers.0.keys": mx.array(NAN_KEYS)})
    with pytest.raises(MemoryFormatError, match=r"bad.st: tensor 'layers.0.keys': expected fin"):
        TorchMemory.load(bad)
    flipped = rewritten(
        good, tmp_path / "f.st", {"layers.0.keys": mx.zeros((24, 64))}, rehash=False
    )
    with pytest.raises(MemoryFormatError, match=r"tensor 'layers.0.keys' does not match its sha"):
        TorchMemory.load(flipped)
