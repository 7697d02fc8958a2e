"""Seeded fuzzing of the memory file: a few hundred corruptions of valid memories (a plain one,
and one with int8 keys, a PCA projection and a router probe). Each load either raises
MemoryFormatError or gives a memory whose outputs equal the original's.

Corruptions of the content come in two kinds: with the file's hashes left as they were (what
a flipped byte or a careless edit gives; the hashes must catch it) and with the hashes
recomputed (a careful forger; only invalid values are made, which the schema must catch).
"""

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import Memory, MemoryFormatError, MemoryMismatchError, attach, detach
from mlx_knnmoe.memory.compress import compress
from tests.helpers import memory_from, rewritten, tokens

VARIANTS = 600
SEED = 1234
REMOVE = object()  # a metadata field taken out


class Raw(str):
    """Metadata text written as it is (not JSON-encoded)."""


BAD_NUMBERS = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), [1.0], "1", None, True, {}]


def set_value(tensor: mx.array, value: float, rng) -> mx.array:
    x = np.array(tensor.astype(mx.float32))
    x.flat[rng.integers(x.size)] = value
    return mx.array(x).astype(tensor.dtype)


def tensor_mutations(arrays: dict, rng):
    """(description, tensor changes, may the hashes be recomputed): with recomputed hashes,
    only changes that make the file invalid."""
    name = str(rng.choice(sorted(arrays)))
    x = arrays[name]
    layer = name.split(".")[1]
    other = str(rng.choice(sorted(arrays)))
    floats = x.dtype in (mx.float32, mx.float16, mx.bfloat16)
    choices = [
        (f"{name} renamed with a leading zero", {name: None, name.replace(".", ".0", 1): x}),
        (f"{name} renamed with a unicode digit", {name: None, f"layers.\u0661{name[8:]}": x}),
        (f"{name} renamed to an unknown field", {name: None, f"layers.{layer}.values": x}),
        (f"{name} without its layer", {name: None, name.split(".")[-1]: x}),
        (f"{name} with one row less", {name: x[:-1]}),
        (f"{name} with no rows", {name: x[:0]}),
        (f"{name} with an axis more", {name: x[None]}),
        (f"{name} as int32", {name: x.astype(mx.int32)}),
        (f"{name} as float64-like int16", {name: x.astype(mx.int16)}),
        (f"an extra tensor next to {name}", {f"layers.{layer}.extra": x}),
    ]
    if name.endswith(("keys", "logits")) and "probe" not in name:
        choices.append((f"{name} removed", {name: None}))
    if floats:
        value = float(rng.choice([np.nan, np.inf, -np.inf]))
        choices.append((f"{name} with a {value}", {name: set_value(x, value, rng)}))
    if name.endswith("key_scales"):
        choices.append((f"{name} with a 0", {name: set_value(x, 0.0, rng)}))
        choices.append((f"{name} with a negative", {name: set_value(x, -1.0, rng)}))
        choices.append((f"{name} removed", {name: None}))
    if rng.integers(4) == 0 and other != name:
        # a valid file if the hashes were recomputed, so only ever with the old hashes
        return f"{other} replaced by {name}", {other: x}, False
    return (*choices[rng.integers(len(choices))], True)


def metadata_mutations(meta: dict, rng):
    """(description, metadata changes): every one makes the file invalid."""
    fields = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    bad = BAD_NUMBERS[rng.integers(len(BAD_NUMBERS))]
    layer = str(rng.choice(sorted(fields["bandwidth"])))
    fp = fields["fingerprint"]
    fp_field = str(rng.choice(sorted(fp)))
    choices = [
        ("format changed", {"format": "mlx"}),
        ("version 9", {"version": "9"}),
        ("version missing", {"version": REMOVE}),
        (f"bandwidth {layer} = {bad!r}", {"bandwidth": {**fields["bandwidth"], layer: bad}}),
        (
            f"bandwidth {layer} missing",
            {"bandwidth": {k: v for k, v in fields["bandwidth"].items() if k != layer}},
        ),
        ("bandwidth of an unknown layer", {"bandwidth": {**fields["bandwidth"], "7": 1.0}}),
        ("bandwidth with a key 00", {"bandwidth": {**fields["bandwidth"], "00": 1.0}}),
        (f"fingerprint.{fp_field} = {bad!r}", {"fingerprint": {**fp, fp_field: bad}}),
        (
            f"fingerprint.{fp_field} missing",
            {"fingerprint": {k: v for k, v in fp.items() if k != fp_field}},
        ),
        ("moe_layers without a memorised layer", {"fingerprint": {**fp, "moe_layers": [9]}}),
        ("num_experts changed", {"fingerprint": {**fp, "num_experts": fp["num_experts"] + 1}}),
        ("hidden_size changed", {"fingerprint": {**fp, "hidden_size": fp["hidden_size"] * 2}}),
        ("retrieval.k = 2.5", {"retrieval": {"k": 2.5}}),
        ("retrieval.k = 0", {"retrieval": {"k": 0}}),
        ("retrieval.mix unknown", {"retrieval": {"mix": "blend"}}),
        (
            f"retrieval.lambda_scale = {bad!r}",
            {"retrieval": {"lambda_scale": bad}}
            if bad not in (0.0, True)
            else {"retrieval": {"lambda_scale": -1.0}},
        ),
        ("build.eta = nan", {"build": {"eta": float("nan")}}),
        ("build.config.steps = 0", {"build": {"config": {"steps": 0}}}),
        ("compression.keys = int4", {"compression": {"keys": "int4"}}),
    ]
    for name in ("fingerprint", "bandwidth", "retrieval", "build", "compression"):
        choices.append(
            (f"{name} = {bad!r}", {name: bad})
            if not isinstance(bad, dict)
            else (f"{name} = []", {name: []})
        )
        choices.append((f"{name} nested deeply", {name: Raw("[" * 50_000 + "]" * 50_000)}))
        choices.append((f"{name} not JSON", {name: Raw("{")}))
        if name != "compression":  # written by versions before compression existed
            choices.append((f"{name} removed", {name: REMOVE}))
    description, changes = choices[rng.integers(len(choices))]
    return description, {
        k: None
        if v is REMOVE
        else v
        if isinstance(v, Raw) or k in ("format", "version")
        else json.dumps(v)
        for k, v in changes.items()
    }


def byte_mutation(raw: bytes, rng) -> tuple[str, bytes]:
    data = bytearray(raw)
    kind = rng.integers(4)
    if kind == 0:
        at = rng.integers(len(data))
        data[at] ^= int(rng.integers(1, 256))
        return f"byte {at} flipped", bytes(data)
    if kind == 1:
        at = rng.integers(8 + int.from_bytes(raw[:8], "little"), len(data) - 64)
        data[at : at + 64] = b"\xff" * 64
        return f"64 bytes at {at} set to 0xff", bytes(data)
    if kind == 2:
        at = rng.integers(len(data))
        return f"truncated at {at}", bytes(data[:at])
    return "garbage appended", bytes(data) + b"\x00garbage"


@pytest.fixture(scope="module")
def originals(olmoe, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    memory = memory_from(olmoe, tokens(0))
    memory.retrieval = {"k": 2, "mix": "topk"}
    plain = memory.save(root / "plain.st")
    packed = compress(memory, keys="int8", pca=16, model=olmoe).save(root / "packed.st")
    return {path: outputs(olmoe, Memory.load(path)) for path in (plain, packed)}


def outputs(model, memory) -> np.ndarray:
    attach(model, memory)
    try:
        return np.array(model(tokens(5, (1, 10))))
    finally:
        detach(model)


def test_every_corruption_is_refused_or_harmless(olmoe, originals, tmp_path):
    rng = np.random.default_rng(SEED)
    refused = harmless = 0
    sources = sorted(originals)
    for i in range(VARIANTS):
        source = sources[i % len(sources)]
        path = tmp_path / f"v{i}.st"
        kind = rng.integers(3)
        arrays, meta = mx.load(str(source), format="safetensors", return_metadata=True)
        if kind == 0:
            what, changes, forgeable = tensor_mutations(arrays, rng)
            rehash = forgeable and bool(rng.integers(2))
            rewritten(source, path, tensors=changes, rehash=rehash)
        elif kind == 1:
            what, changes = metadata_mutations(meta, rng)
            rehash = bool(rng.integers(2))
            rewritten(source, path, meta=changes, rehash=rehash)
        else:
            what, raw = byte_mutation(source.read_bytes(), rng)
            path.write_bytes(raw)
            rehash = False
        label = f"variant {i} of {source.name}: {what} (hashes recomputed: {rehash})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = Memory.load(path)
        except MemoryFormatError as e:
            assert str(path) in str(e) and "\n" not in str(e), (label, str(e))
            refused += 1
            continue
        except Exception as e:  # anything else is a bug
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from e
        try:
            got = outputs(olmoe, loaded)
        except MemoryMismatchError:  # a consistent memory of another model: refused on attach
            refused += 1
            continue
        assert np.array_equal(got, originals[source]), f"{label}: loaded with other outputs"
        harmless += 1
    print(f"{VARIANTS} variants: {refused} refused, {harmless} loaded with equal outputs")
    assert refused + harmless == VARIANTS and refused > VARIANTS * 0.8, (refused, harmless)
