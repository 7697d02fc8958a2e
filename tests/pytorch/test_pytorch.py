"""The PyTorch companion (mlx_knnmoe.pytorch) against the MLX package, architecture by
architecture, on the same tiny random weights: transformers writes a checkpoint (N(0, 0.1)
weights), mlx_knnmoe.convert converts it, and each check compares float32 results of the two
frameworks by max |torch - mlx| / max |mlx| (PARITY).

(a) plain logits; (b) logits with the same memory file attached, per mixing mode and
similarity; (c) the memory each side builds from the same data (S = 1 and 2, token scope,
dense surrogate), keys and optimised logits, and the gradient step itself; the calibrated
build (a guard file): the same settings chosen, the same memory.

Set KNNMOE_PARITY_REPORT=path.json to write every measured error there.
"""

from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from tests.pytorch_helpers import (
    PARITY_ARCHS,
    load_pair,
    make_pair,
    random_tokens,
    relative_error,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import mlx_knnmoe as M  # noqa: E402
from mlx_knnmoe import pytorch as R  # noqa: E402
from mlx_knnmoe.build import calibrate_rule  # noqa: E402
from mlx_knnmoe.build.gradient import optimise_batch as mlx_optimise_batch  # noqa: E402
from mlx_knnmoe.config import BuildConfig, KNNConfig  # noqa: E402
from mlx_knnmoe.data.batches import make_batch  # noqa: E402
from mlx_knnmoe.data.examples import Dataset, Example  # noqa: E402
from mlx_knnmoe.pytorch.arch import moe_blocks, routing_map, spec_for  # noqa: E402
from mlx_knnmoe.pytorch.guard import sample_guard  # noqa: E402
from mlx_knnmoe.pytorch.pipeline import torch_batch  # noqa: E402

PARITY = 1e-4  # float32; measured about 1e-6 everywhere
CHANGED = 1e-2  # a memory must change the logits by more than this, or (b) would prove nothing
ETA = 3.0
MEASURED: dict[str, float] = {}


def check(arch: str, name: str, err: float, limit: float = PARITY) -> None:
    key = f"{arch}:{name}"
    MEASURED[key] = max(err, MEASURED.get(key, 0.0))
    assert err < limit, f"{arch} {name}: relative error {err:.3g} >= {limit:g}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only wait on each other on a busy machine
    yield
    torch.set_num_threads(threads)
    path = os.environ.get("KNNMOE_PARITY_REPORT")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        with open(path, "w") as f:
            json.dump({**old, **MEASURED}, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module", params=PARITY_ARCHS)
def pair(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    hf_dir, mlx_dir = make_pair(root, arch)
    torch_model, mlx_model = load_pair(hf_dir, mlx_dir)
    return SimpleNamespace(
        arch=arch, root=root, hf=hf_dir, mlx=mlx_dir, tm=torch_model, mm=mlx_model
    )


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)))


REF = random_tokens(2, (3, 12))  # memory keys come from these
PROBE = random_tokens(3, (2, 10))  # queries: new tokens, and a row sharing a prefix with REF
PROBE[0, :6] = REF[0, :6]


# -- (a) the plain models, the fingerprint and the routing maps -----------------------------
def test_plain_logits(pair):
    check(
        pair.arch,
        "plain logits",
        relative_error(torch_logits(pair.tm, PROBE), mlx_logits(pair.mm, PROBE)),
    )


def test_fingerprint_matches_mlx(pair):
    assert R.fingerprint(pair.tm) == M.fingerprint(pair.mm)


def test_auto_surrogate_matches_mlx(pair):
    from mlx_knnmoe.build.gradient_context import auto_surrogate as mlx_auto
    from mlx_knnmoe.pytorch.gradient import auto_surrogate as torch_auto

    expected = None if pair.arch in ("olmoe", "qwen2_moe") else 8  # renormalised: 4k = N
    assert torch_auto(pair.tm) == mlx_auto(pair.mm) == expected


def test_routing_map_restates_the_router(pair):
    """What the wrappers run on mixed or optimised logits is the router's own map."""
    spec = spec_for(pair.tm)
    x = torch.randn(64, pair.tm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for block in moe_blocks(pair.tm).values():
        rmap = routing_map(block, spec)
        with torch.no_grad():
            z, w, idx = getattr(block, spec.gate)(x)
            idx2, w2 = rmap.select(z)
        order, order2 = idx.argsort(-1), idx2.argsort(-1)
        assert torch.equal(idx.gather(1, order), idx2.gather(1, order2))
        torch.testing.assert_close(w.gather(1, order), w2.gather(1, order2), rtol=1e-6, atol=1e-7)


# -- (b) a memory attached on both sides ----------------------------------------------------
@pytest.fixture(scope="module")
def memory_file(pair):
    """Keys: router inputs of REF in torch; values: random logits (so routing changes).
    Written by the torch side; the MLX side reads the same file."""
    with torch.no_grad(), R.capture_router_inputs(pair.tm) as rec:
        pair.tm(input_ids=torch.tensor(REF))
    gen = torch.Generator().manual_seed(1)
    keys = {layer: r[0][0] for layer, r in rec.items()}
    logits = {layer: 2.0 * torch.randn(r[0][1].shape, generator=gen) for layer, r in rec.items()}
    return R.Memory(keys, logits, R.fingerprint(pair.tm)).save(pair.root / "torch.st")


@pytest.mark.parametrize("similarity", ["rbf", "cosine"])
@pytest.mark.parametrize("mix", ["topk", "logits", "union"])
def test_memory_logits(pair, memory_file, mix, similarity):
    config = KNNConfig(k=2, similarity=similarity, mix=mix, search="exact")
    plain = mlx_logits(pair.mm, PROBE)
    R.attach(pair.tm, memory_file, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same fingerprint: no router-weight warning
        M.attach(pair.mm, memory_file, config)
    try:
        got, want = torch_logits(pair.tm, PROBE), mlx_logits(pair.mm, PROBE)
    finally:
        R.detach(pair.tm)
        M.detach(pair.mm)
    assert relative_error(want, plain) > CHANGED
    check(pair.arch, f"memory {mix} {similarity}", relative_error(got, want))


@pytest.mark.parametrize("mix", ["topk", "logits", "union"])
def test_lambda_zero_keeps_the_model_exactly(pair, memory_file, mix):
    probe = random_tokens(4, (2, 10))  # no key equals a query: with tau ~ 0 every lambda is 0
    plain = torch_logits(pair.tm, probe)
    R.attach(pair.tm, memory_file, KNNConfig(mix=mix, bandwidth=1e-30))
    try:
        assert np.array_equal(torch_logits(pair.tm, probe), plain)
    finally:
        R.detach(pair.tm)
    assert np.array_equal(torch_logits(pair.tm, probe), plain)  # detach restores the routers


# -- (c) building -----------------------------------------------------------------------------
def dataset() -> Dataset:
    """Examples of several lengths (batches are length-grouped and padded), text-style and
    prompt/answer-style loss masks."""
    rng = np.random.default_rng(5)
    examples = []
    for i, n in enumerate([9, 12, 7, 12, 10]):
        tokens = rng.integers(0, 300, n).tolist()
        mask = [0] + [1] * (n - 1) if i % 2 == 0 else [0] * (n // 2) + [1] * (n - n // 2)
        examples.append(Example(tokens, mask, f"toy:{i}"))
    return Dataset("toy", "toy", "0" * 64, "text", examples)


@pytest.mark.parametrize("steps, recapture", [(1, 0), (2, 0), (1, 2)])
def test_built_memory(pair, steps, recapture):
    kwargs = dict(eta=ETA, steps=steps, recapture=recapture, batch_tokens=30, progress=False)
    ours = R.build_memory(pair.tm, None, dataset(), **kwargs)
    kwargs["values"] = "float32"  # as torch stores them (MLX's default, float16, is cast first)
    theirs = M.build_memory(pair.mm, None, dataset(), **kwargs)
    assert ours.layers == theirs.layers and ours.fingerprint == theirs.fingerprint
    assert ("recapture_seconds" in ours.build) == bool(recapture)
    if recapture:  # the keys moved: a torch build that skipped the passes would not match
        plain = M.build_memory(pair.mm, None, dataset(), **{**kwargs, "recapture": 0})
        assert any(not np.allclose(plain.keys[i], theirs.keys[i]) for i in ours.layers[1:])
    name = f"build S={steps} recapture {recapture}"
    for layer in ours.layers:
        keys, logits = np.array(theirs.keys[layer]), np.array(theirs.logits[layer])
        assert ours.keys[layer].shape == keys.shape  # same positions stored
        check(pair.arch, f"{name} keys", relative_error(ours.keys[layer].numpy(), keys))
        check(pair.arch, f"{name} logits", relative_error(ours.logits[layer].numpy(), logits))
        assert ours.bandwidth[layer] == pytest.approx(theirs.bandwidth[layer], rel=PARITY)
    # and the MLX file reads back in torch, entry for entry
    path = theirs.save(pair.root / f"mlx-S{steps}.st", force=True)
    loaded = R.Memory.load(path)
    assert loaded.build["eta"] == ETA and loaded.bandwidth == pytest.approx(theirs.bandwidth)
    for layer in ours.layers:
        assert np.array_equal(loaded.logits[layer].numpy(), np.array(theirs.logits[layer]))


def calibration_dataset() -> Dataset:
    """Examples sharing a phrase after a random first token, so a memory of some helps on the
    held-out ones; no two keys are equal (on equal keys the frameworks' top-k break ties
    differently, and so would the memories)."""
    rng = np.random.default_rng(7)
    phrase = rng.integers(0, 300, 8).tolist()
    examples = []
    for i in range(8):
        first, middle = rng.integers(0, 300, 1).tolist(), rng.integers(0, 300, 2).tolist()
        tokens = first + phrase + middle + phrase[:4]
        examples.append(Example(tokens, [0] + [1] * (len(tokens) - 1), f"phrase:{i}"))
    return Dataset("phrase", "phrase", "0" * 64, "text", examples)


def test_calibrated_memory(pair):
    """The default build (eta auto, calibrate, layer_eta, one re-capture) with a guard file:
    both sides try the same settings, score them alike, keep the same ones and store the
    same memory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair.hf)
    guard = pair.root / "guard.jsonl"
    guard.write_text(
        "".join(json.dumps({"text": f"guard text {i} of things"}) + "\n" for i in range(5))
    )
    kwargs = dict(eta_grid=(1.0, 3.0, 10.0), batch_tokens=30, progress=False, guard=str(guard))
    kwargs["retrieval"] = KNNConfig(search="exact")
    ours = R.build_memory(pair.tm, tokenizer, calibration_dataset(), **kwargs)
    theirs = M.build_memory(pair.mm, tokenizer, calibration_dataset(), values="float32", **kwargs)
    a, b = ours.build["calibration"], theirs.build["calibration"]
    assert a["guard_sequences"] == b["guard_sequences"] == 5
    assert (a["eta"], a["scales"], a["layer_eta"]) == (b["eta"], b["scales"], b["layer_eta"])
    assert ours.build["eta"] == theirs.build["eta"] == a["eta"]
    assert set(a["scales"].values()) != {1.0}  # calibration changed something to agree on
    assert [(t["eta"], t["scales"], t["guard_ok"]) for t in a["trials"]] == [
        (t["eta"], t["scales"], t["guard_ok"]) for t in b["trials"]
    ]
    nll = [[t["heldout_nll"] for t in c["trials"]] + [c["plain_heldout_nll"]] for c in (a, b)]
    check(pair.arch, "calibration held-out NLL", relative_error(*nll))
    assert ours.layers == theirs.layers == [x for x, s in a["scales"].items() if s > 0]
    for layer in ours.layers:
        keys, logits = np.array(theirs.keys[layer]), np.array(theirs.logits[layer])
        check(pair.arch, "calibrated keys", relative_error(ours.keys[layer].numpy(), keys))
        check(pair.arch, "calibrated logits", relative_error(ours.logits[layer].numpy(), logits))
        assert ours.bandwidth[layer] == pytest.approx(theirs.bandwidth[layer], rel=PARITY)


def test_sampled_guard_is_seeded(pair):
    a = sample_guard(pair.tm, 3, count=4, length=9, seed=1)
    assert [e.tokens for e in a] == [e.tokens for e in sample_guard(pair.tm, 3, 4, 9, seed=1)]
    assert [e.tokens for e in a] != [e.tokens for e in sample_guard(pair.tm, 3, 4, 9, seed=2)]
    assert len(a) == 4 and all(len(e.tokens) == 9 and e.tokens[0] == 3 for e in a)
    assert a[0].loss_mask == [0] + [1] * 8 and len({tuple(e.tokens) for e in a}) > 1


def test_calibration_scales_a_torch_memory(pair):
    memory = R.build_memory(pair.tm, None, dataset(), eta=ETA, batch_tokens=30, progress=False)
    first, *rest = memory.layers
    out = calibrate_rule.scaled(memory, {first: 0.0, rest[0]: 2.0})
    assert type(out) is R.Memory and out.layers == rest
    assert out.bandwidth[rest[0]] == pytest.approx(2.0 * memory.bandwidth[rest[0]])


VARIANTS = {
    "S=1": dict(steps=1),
    "S=2": dict(steps=2),
    "token scope": dict(scope="token"),
    "dense surrogate 4": dict(surrogate=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_step(pair, variant):
    """The step r - z itself (not only r, which z dominates) agrees, per MoE layer."""
    examples = dataset().examples
    batch = make_batch(examples, [1, 0, 2])
    theirs = mlx_optimise_batch(
        pair.mm, batch.tokens, batch.loss_mask, batch.keep_mask, [ETA], **VARIANTS[variant]
    )
    ours = R.optimise_batch(
        pair.tm, *torch_batch(examples, [1, 0, 2], "all", "cpu"), [ETA], **VARIANTS[variant]
    )
    assert ours.loss_before == pytest.approx(theirs.loss_before, rel=PARITY)
    for layer in theirs.keys:
        step = np.array(theirs.logits[ETA][layer] - theirs.router_logits[layer])
        got = (ours.logits[ETA][layer] - ours.router_logits[layer]).numpy()
        assert np.abs(step).max() > CHANGED
        check(pair.arch, f"step {variant}", relative_error(got, step))


# -- the memory file, the parity script, CUDA -------------------------------------------------
def test_memory_file_both_ways(tmp_path):
    gen = torch.Generator().manual_seed(0)
    keys = {1: torch.randn(5, 8, generator=gen), 3: torch.randn(4, 8, generator=gen)}
    logits = {1: torch.randn(5, 4, generator=gen), 3: torch.randn(4, 4, generator=gen)}
    fp = {"model_type": "olmoe", "hidden_size": 8, "num_experts": 4, "top_k": 2}
    fp.update(moe_layers=[1, 3], router_hash={"1": "a", "3": "b"})
    ours = R.Memory(keys, logits, fp, build={"eta": 1.0}, retrieval={"k": 2})
    ours.compression = {"keys": "int8"}
    theirs = M.Memory.load(ours.save(tmp_path / "a.st"))
    assert theirs.retrieval == {"k": 2} and theirs.compression["keys"] == "int8"
    for layer in (1, 3):
        assert theirs.keys[layer].dtype == mx.int8  # int8 in RAM
        np.testing.assert_allclose(theirs.dense_keys(layer), keys[layer], atol=0.05)
        assert theirs.bandwidth[layer] == pytest.approx(ours.bandwidth[layer], rel=1e-5)
    back = R.Memory.load(theirs.save(tmp_path / "b.st"))
    for layer in (1, 3):
        np.testing.assert_array_equal(back.keys[layer].numpy(), np.array(theirs.keys[layer]))
        np.testing.assert_array_equal(back.logits[layer].numpy(), logits[layer].numpy())
    with pytest.raises(FileExistsError):
        ours.save(tmp_path / "a.st")


def test_parity_script(tmp_path, capsys):
    from mlx_knnmoe.pytorch.parity import main

    hf_dir, mlx_dir = make_pair(tmp_path, "qwen3_moe")
    model, _ = R.load_model(hf_dir, device="cpu")
    with torch.no_grad(), R.capture_router_inputs(model) as rec:
        model(input_ids=torch.tensor(REF))
    keys = {layer: r[0][0] for layer, r in rec.items()}
    logits = {layer: r[0][1] + 1.0 for layer, r in rec.items()}
    path = R.Memory(keys, logits, R.fingerprint(model)).save(tmp_path / "m.st")
    argv = ["--model", str(hf_dir), "--device", "cpu", "--memory", str(path), "--max-tokens", "40"]
    assert main(argv) == 0  # converts the checkpoint itself
    out = capsys.readouterr().out
    assert "router weights hash equal on both sides: yes" in out
    for title in ("plain models", "memory, mix=topk", "memory, mix=logits", "memory, mix=union"):
        line = next(x for x in out.splitlines() if x.startswith(title))
        assert float(line.split("logits rel. error ")[1].split(",")[0]) < PARITY
        assert "top-1 agreement 100.0%" in line
    assert main(["--model", str(hf_dir), "--mlx-model", str(mlx_dir), "--device", "cpu"]) == 0
    assert "100.0%" in capsys.readouterr().out


def test_build_memory_cli_and_mlx_generation(tmp_path, capsys, monkeypatch):
    """A memory built from a data file on the torch side (eta auto, calibrated by default as in
    MLX) drives MLX generation; the calibration flags are the MLX command's."""
    from click.testing import CliRunner
    from mlx_lm import generate

    from mlx_knnmoe.pytorch.build_memory import cli

    hf_dir, mlx_dir = make_pair(tmp_path, "mixtral")
    data, guard = tmp_path / "ref.jsonl", tmp_path / "guard.jsonl"
    lines = [f"The patient {i} presents with fever and cough. The answer is A." for i in range(6)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    guard.write_text("".join(json.dumps({"text": f"a walk {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "med.st"
    argv = ["--model", str(hf_dir), "--data", str(data), "--out", str(out), "--device", "cpu"]
    argv += ["--eta-grid", "0.3,3", "--heldout", "0.3", "--quiet"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert "eta auto on 2 held-out examples" in result.output
    assert f"under a {BuildConfig.guard_samples}-sequence guard" in result.output
    memory = M.Memory.load(out)
    calibration = memory.build["calibration"]
    assert memory.build["eta"] == calibration["eta"] and calibration["layer_eta"] is None
    assert memory.build["eta_auto"]["grid"] == [0.3, 3.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, tokenizer = M.load(str(mlx_dir), memory=str(out))
    assert len(generate(model, tokenizer, "The patient", max_tokens=3)) > 0
    result = CliRunner().invoke(cli, argv + ["--force", "--guard", str(guard), "--layer-eta"])
    assert result.exit_code == 0, result.output
    calibration = M.Memory.load(out).build["calibration"]
    assert calibration["guard_sequences"] == 3 and calibration["layer_eta"] is not None
    result = CliRunner().invoke(cli, argv + ["--force", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    memory = M.Memory.load(out)
    assert "calibration" not in memory.build and memory.build["eta"] in (0.3, 3.0)
    monkeypatch.setattr(calibrate_rule, "guard_ok", lambda *a: (1.0, False))
    result = CliRunner().invoke(cli, argv + ["--force"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "calibrate: no setting lowered the held-out NLL" in result.output
    assert "rerun with --no-calibrate" in result.output
    result = CliRunner().invoke(cli, argv + ["--eta", "1"])
    assert result.exit_code == 1 and "exists; pass --force" in result.output


def test_bfloat16_builds_and_mixes(pair):
    """What GPU users run: a bfloat16 model builds (every variant) and mixes (every mode)."""
    model, _ = R.load_model(pair.hf, device="cpu", dtype="bfloat16")
    for variant in VARIANTS.values():
        kwargs = dict(eta=ETA, batch_tokens=30, progress=False, **variant)
        memory = R.build_memory(model, None, dataset(), **kwargs)
    assert all(torch.isfinite(v).all() for v in memory.logits.values())
    plain = torch_logits(model, PROBE).astype(np.float32)
    for mix in ("topk", "logits", "union"):
        R.attach(model, memory, KNNConfig(k=2, mix=mix))
        try:
            got = torch_logits(model, PROBE).astype(np.float32)
        finally:
            R.detach(model)
        assert np.isfinite(got).all() and relative_error(got, plain) > CHANGED


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tmp_path):
    hf_dir, _ = make_pair(tmp_path, "deepseek_v3")
    cpu, _ = R.load_model(hf_dir, device="cpu", dtype="float32")
    gpu, _ = R.load_model(hf_dir, device="cuda", dtype="float32")
    kwargs = dict(eta=ETA, batch_tokens=30, progress=False)
    a = R.build_memory(cpu, None, dataset(), **kwargs)
    b = R.build_memory(gpu, None, dataset(), **kwargs)
    guard = [e.tokens for e in sample_guard(gpu, 0, count=3, length=6, seed=1)]
    assert guard == [e.tokens for e in sample_guard(gpu, 0, count=3, length=6, seed=1)]
    for layer in a.layers:
        assert relative_error(b.logits[layer].numpy(), a.logits[layer].numpy()) < 1e-3
    for mix in ("topk", "logits", "union"):
        config = KNNConfig(k=2, mix=mix)
        R.attach(cpu, a, config)
        R.attach(gpu, a, config)
        with torch.no_grad():
            want = cpu(input_ids=torch.tensor(PROBE)).logits.numpy()
            got = gpu(input_ids=torch.tensor(PROBE).cuda()).logits.cpu().numpy()
        assert relative_error(got, want) < 1e-3
        R.detach(cpu)
        R.detach(gpu)
