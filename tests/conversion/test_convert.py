"""mlx_knnmoe.convert: tiny checkpoints written by transformers itself, for every supported
architecture, converted offline (float and 4-bit), compared with transformers' logits, generated
from; fix-ups, router precision, packaged memories, refused and warned cases."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe import Memory, fingerprint, load
from mlx_knnmoe.arch.specs import get_path, moe_layers, spec_for
from mlx_knnmoe.commands.convert import cli
from mlx_knnmoe.conversion.convert_model import convert_model, parse_memories
from mlx_knnmoe.conversion.hf_fixups import config_fixups, yarn_inv_freq
from mlx_knnmoe.memory.validation import validate_for_model
from tests.helpers import captured, memory_from, tokens
from tests.tiny_models import HF_OVERRIDES, TINY_CONFIGS, cast, make_hf_checkpoint, tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = sorted(TINY_CONFIGS)
PARITY = 1e-4  # max |mlx - transformers| / max |transformers| of float32 logits (found ~1e-6)


def quiet(_):
    pass


def reference_logits(hf_dir, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def router(model, layer: int):
    return get_path(moe_layers(model)[layer], spec_for(model).gate)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("arch", ARCHS)
def test_converts_float_and_4bit_and_generates(arch, tmp_path):
    from mlx_lm import generate
    from mlx_lm import load as mlx_load

    hf_dir = make_hf_checkpoint(tmp_path / "hf", arch)
    ids = np.random.default_rng(0).integers(0, 300, (2, 10))
    want = reference_logits(hf_dir, ids)

    out = convert_model(str(hf_dir), tmp_path / "float", log=quiet)
    model, tokenizer = mlx_load(str(out))
    assert relative_error(np.array(model(mx.array(ids))), want) < PARITY
    assert len(generate(model, tokenizer, "The patient", max_tokens=3)) > 0

    out = convert_model(str(hf_dir), tmp_path / "q4", quantize=True, log=quiet)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, tokenizer = mlx_load(str(out))
    assert len(generate(model, tokenizer, "The patient", max_tokens=3)) > 0
    gate = router(model, next(iter(moe_layers(model))))
    if isinstance(gate, nn.Linear | nn.QuantizedLinear):  # DeepSeek/GLM gates are not Linear
        assert isinstance(gate, nn.QuantizedLinear) and gate.bits == 8


def test_config_fixups_for_transformers_5():
    rope = {"rope_type": "default", "rope_theta": 5e5}
    fix = config_fixups({"model_type": "qwen2_moe", "rope_parameters": rope, "dtype": "bfloat16"})
    assert fix.patch == {"rope_theta": 5e5, "rope_scaling": None, "torch_dtype": "bfloat16"}
    fix = config_fixups({"model_type": "qwen3_moe", "num_local_experts": 128, "rope_theta": 1e6})
    assert fix.patch == {"num_experts": 128}  # transformers-4 configs need nothing else
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    fix = config_fixups({"model_type": "glm4_moe", "rope_parameters": rope})
    assert fix.patch["partial_rotary_factor"] == 0.5
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 32.0}
    fix = config_fixups({"model_type": "deepseek_v2", "rope_parameters": yarn})
    assert fix.patch["rope_scaling"] == {
        "factor": 4.0,
        "beta_fast": 32.0,
        "type": "yarn",
        "rope_type": "yarn",
    }
    assert not fix.warnings


def test_yarn_formula_matches_mlx_lm():
    from mlx_lm.models.rope_utils import YarnRoPE

    rope = dict(rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096)
    ours = yarn_inv_freq(64, rope, truncate=True)
    theirs = 1.0 / np.array(YarnRoPE(64, base=150000.0, scaling_factor=32.0)._freqs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_yarn_without_truncation_is_reported(tmp_path):
    rope = dict(HF_OVERRIDES["gpt_oss"]["rope_parameters"], truncate=False)
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "gpt_oss", rope_parameters=rope)
    result = run("--hf-path", hf_dir, "--mlx-path", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "warning: rope_parameters has YaRN with truncate: false" in result.output
    assert "differ from the checkpoint's by up to 17.08% (rotary pairs 1-2 of 8)" in result.output
    from mlx_lm import load as mlx_load

    ids = np.random.default_rng(0).integers(0, 300, (1, 40))
    got = np.array(mlx_load(str(tmp_path / "out"))[0](mx.array(ids)))
    assert relative_error(got, reference_logits(hf_dir, ids)) > 100 * PARITY  # it matters


def test_refuses_to_overwrite_without_force(tmp_path):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "olmoe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    result = run("--hf-path", hf_dir, "--mlx-path", out)
    assert result.exit_code == 1 and "exists; pass --force" in result.output
    assert (out / "mine.txt").read_text() == "user data"
    result = run("--hf-path", hf_dir, "--mlx-path", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporaries


def test_router_bits(tmp_path):
    from mlx_lm import load as mlx_load

    hf_dir = make_hf_checkpoint(tmp_path / "hf", "mixtral")
    out = convert_model(str(hf_dir), tmp_path / "a", quantize=True, router_bits="float", log=quiet)
    model = mlx_load(str(out))[0]
    assert type(router(model, 0)) is nn.Linear
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    out = convert_model(
        str(hf_dir), tmp_path / "b", quantize=True, q_bits=3, router_bits="4", log=quiet
    )
    assert router(mlx_load(str(out))[0], 0).bits == 4
    result = run("--help")
    assert "routers stay at 8 bits or more unless you ask" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A transformers checkpoint, its float conversion and a memory built on that."""
    from mlx_lm import load as mlx_load

    root = tmp_path_factory.mktemp("qwen")
    hf_dir = make_hf_checkpoint(root / "hf", "qwen3_moe")
    float_dir = convert_model(str(hf_dir), root / "float", log=quiet)
    model = mlx_load(str(float_dir))[0]
    cap = captured(model, tokens(0, (4, 32)))
    keys = {layer: x for layer, (x, _) in cap.items()}
    logits = {layer: z + 0.5 for layer, (_, z) in cap.items()}
    memory = Memory(keys, logits, fingerprint(model)).save(root / "med.st")
    return hf_dir, memory


def test_packaged_memory_loads_by_name_with_router_agreement(qwen, tmp_path):
    hf_dir, memory = qwen
    out = tmp_path / "q4"
    result = run(
        "--hf-path", hf_dir, "--mlx-path", out, "-q", "--q-bits", "4",
        "--router-bits", "4", "--memory", f"med={memory}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "memories" / "med.st").exists()
    packaged = Memory.load(out / "memories" / "med.st")
    assert sorted(packaged.probe) == [1, 2] and packaged.probe[1][0].shape == (64, 64)
    agreement = r"keeps the same top-2 experts for \d+\.\d% of them.*logits differ by up to"
    assert "warning: " in result.output and "router weights differ" in result.output
    with pytest.warns(UserWarning, match=r"router weights differ .*layers \[1, 2\].*" + agreement):
        model, _ = load(str(out), memory="med")
    assert router(model, 1).memory is not None


def test_probe_comes_from_the_dtype_the_memory_was_built_in(qwen, tmp_path):
    from mlx_lm import load as mlx_load

    hf_dir, memory = qwen
    model = cast(mlx_load(str(hf_dir.parent / "float"))[0], mx.bfloat16)
    source = Memory.load(memory)
    path = Memory(source.keys, source.logits, fingerprint(model)).save(tmp_path / "bf16.st")
    with pytest.warns(UserWarning, match="same top-2 experts for 100.0% of them"):
        out = convert_model(
            str(hf_dir),
            tmp_path / "q",
            quantize=True,
            dtype="bfloat16",
            memories={"med": str(path)},
            log=quiet,
        )
    assert sorted(Memory.load(out / "memories" / "med.st").probe) == [1, 2]


def test_memory_without_probe_says_agreement_is_unknown(qwen, tmp_path):
    from mlx_lm import load as mlx_load

    hf_dir, memory = qwen
    out = convert_model(str(hf_dir), tmp_path / "q4", quantize=True, log=quiet)
    model = mlx_load(str(out))[0]
    with pytest.warns(UserWarning, match="no router probe, so how much the routing changed"):
        validate_for_model(Memory.load(memory), model)


def test_memory_for_another_model_is_refused(qwen, tmp_path):
    hf_dir, _ = qwen
    path = memory_from(tiny_model("olmoe"), tokens(0)).save(tmp_path / "olmoe.st")
    out = tmp_path / "out"
    result = run("--hf-path", hf_dir, "--mlx-path", out, "--memory", f"med={path}")
    assert result.exit_code == 1
    assert "does not fit this model" in result.output
    assert "model_type: memory has 'olmoe', model has 'qwen3_moe'" in result.output
    assert not out.exists()


def test_memory_option_errors():
    assert parse_memories(["med=a.st", "law=hf/repo:law.st"]) == {
        "med": "a.st",
        "law": "hf/repo:law.st",
    }
    for bad, message in [
        ("med.st", "expected NAME=FILE"),
        ("../x=a.st", "NAME must be"),
        ("med.st=a.st", "without the .st suffix"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_memories([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_memories(["a=x.st", "a=y.st"])
    result = run("--hf-path", "x", "--memory", "nonsense")
    assert result.exit_code == 2 and "expected NAME=FILE" in result.output
