"""Attaching, detaching and the effect of a memory on whole models of every architecture."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, Memory, attach, configure, detach, knn_stats, set_stats
from mlx_knnmoe.arch.specs import get_path, spec_for
from tests.helpers import captured, dense_assignment, force_expert, memory_from, tokens
from tests.tiny_models import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)
MIXES = ["union", "topk", "logits"]


def far_away(memory: Memory) -> Memory:
    keys = {layer: k + 1000.0 for layer, k in memory.keys.items()}
    return Memory(keys, memory.logits, memory.fingerprint, bandwidth=memory.bandwidth)


@pytest.mark.parametrize("arch", ARCHS)
def test_lambda_zero_is_bit_identical(arch):
    model = tiny_model(arch)
    toks = tokens(0)
    plain = np.array(model(toks))
    memory = memory_from(model, toks, force_expert(0))
    for mix in MIXES:
        attach(model, memory, KNNConfig(k=1, mix=mix, lambda_scale=0.0))
        assert np.array_equal(np.array(model(toks)), plain), f"{mix}, lambda_scale=0"
        # retrieval runs, but nothing is similar: lambda underflows to 0 token by token
        attach(model, far_away(memory), KNNConfig(k=1, mix=mix))
        assert np.array_equal(np.array(model(toks)), plain), f"{mix}, far memory"
        attach(model, memory, KNNConfig(k=1, mix=mix))
        assert not np.allclose(np.array(model(toks)), plain), f"{mix}: memory has no effect"


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("mix", MIXES)
def test_forcing_memory_selects_the_forced_expert(arch, mix):
    model = tiny_model(arch)
    toks = tokens(0)
    memory = memory_from(model, toks, force_expert(3))
    attach(model, memory, KNNConfig(k=1, mix=mix))
    for layer, x in memory.keys.items():
        a = dense_assignment(model, layer, x)
        # the queries are the stored keys, so lambda = 1 and the assignment is the memory's
        assert (a[:, 3] > 0).all(), f"layer {layer}: expert 3 not used"
        if mix != "union":
            assert (np.count_nonzero(a, axis=-1) == 2).all(), "topk/logits keep k experts"


def test_union_runs_extra_experts_and_topk_keeps_cost():
    model = tiny_model("olmoe")
    toks = tokens(0)
    memory = memory_from(model, toks, lambda z: -z)  # the opposite experts
    x = captured(model, toks)[1][0]
    attach(model, memory, KNNConfig(k=1, mix="union", lambda_scale=0.5))
    assert (np.count_nonzero(dense_assignment(model, 1, x), axis=-1) == 4).all()
    configure(model, mix="topk")
    assert (np.count_nonzero(dense_assignment(model, 1, x), axis=-1) == 2).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_model(bits):
    model = tiny_model("qwen3_moe")
    nn.quantize(model, group_size=32, bits=bits)
    assert type(model.layers[1].mlp.gate).__name__ == "QuantizedLinear"
    toks = tokens(0)
    plain = np.array(model(toks))
    memory = memory_from(model, toks, force_expert(5))
    attach(model, memory, KNNConfig(k=1, lambda_scale=0.0))
    assert np.array_equal(np.array(model(toks)), plain)
    attach(model, memory)
    for layer, x in memory.keys.items():
        assert (dense_assignment(model, layer, x)[:, 5] > 0).all()
    detach(model)
    assert np.array_equal(np.array(model(toks)), plain)


def test_lora_wrapped_router():
    from mlx_lm.tuner.lora import LoRALinear

    model = tiny_model("mixtral")
    for layer in model.layers:
        lora = LoRALinear.from_base(layer.block_sparse_moe.gate, r=4)
        lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.5  # a LoRA that changes routing
        layer.block_sparse_moe.gate = lora
    toks = tokens(0)
    plain = np.array(model(toks))
    memory = memory_from(model, toks)
    attach(model, memory, KNNConfig(k=1, lambda_scale=0.0))
    assert np.array_equal(np.array(model(toks)), plain)
    detach(model)
    assert all(isinstance(layer.block_sparse_moe.gate, LoRALinear) for layer in model.layers)


@pytest.mark.parametrize("arch", ["qwen2_moe", "granitemoe", "deepseek_v2"])
def test_detach_restores_modules_and_parameters(arch):
    model = tiny_model(arch)
    spec = spec_for(model)
    block = getattr(model.layers[2], spec.block)
    gate, experts = get_path(block, spec.gate), get_path(block, spec.experts)
    names = sorted(k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    toks = tokens(0)
    plain = np.array(model(toks))
    attach(model, memory_from(model, toks, force_expert(1)))
    assert get_path(block, spec.gate) is not gate
    detach(model)
    assert get_path(block, spec.gate) is gate and get_path(block, spec.experts) is experts
    after = sorted(k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    assert after == names
    assert np.array_equal(np.array(model(toks)), plain)
    assert not hasattr(model, "_knnmoe_routers")


def test_memory_subset_of_layers_leaves_other_layers_plain():
    model = tiny_model("olmoe")
    toks = tokens(0)
    full = memory_from(model, toks, force_expert(6))
    only = Memory({1: full.keys[1]}, {1: full.logits[1]}, full.fingerprint)
    attach(model, only)
    assert (dense_assignment(model, 1, full.keys[1])[:, 6] > 0).all()
    assert not (dense_assignment(model, 2, full.keys[2])[:, 6] > 0).all()


@pytest.mark.parametrize("mix", MIXES)
def test_stats_report_lambda_and_changed_experts(mix):
    model = tiny_model("olmoe")
    toks = tokens(0)
    attach(model, memory_from(model, toks, force_expert(7)), KNNConfig(k=1, mix=mix))
    set_stats(model)
    mx.eval(model(toks))
    stats = knn_stats(model)
    assert sorted(stats) == [0, 1, 2]
    assert all(s["tokens"] == toks.size for s in stats.values())
    # layer 0 sees exactly the stored inputs; later layers see inputs the memory has moved
    assert stats[0]["mean_lambda"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < stats[0]["changed_share"] <= 1.0  # expert 7 is rarely among the own top-2
    assert all(0 < s["mean_lambda"] <= 1 for s in stats.values())
    attach(model, far_away(memory_from(model, toks)), KNNConfig(k=1, mix=mix))
    set_stats(model)
    mx.eval(model(toks))
    assert all(s["mean_lambda"] == 0 and s["changed_share"] == 0 for s in knn_stats(model).values())


@pytest.mark.parametrize("mix", MIXES)
def test_bfloat16_router(mix):
    # MLX's CPU gather_mm is float32-only, so only the routers are bfloat16 here
    from tests.tiny_models import cast

    model = tiny_model("qwen3_moe")
    for layer in model.layers[1:]:
        cast(layer.mlp.gate, mx.bfloat16)
    toks = tokens(0)
    plain = np.array(model(toks))
    memory = memory_from(model, toks, force_expert(2))
    attach(model, memory, KNNConfig(k=1, mix=mix, lambda_scale=0.0))
    assert np.array_equal(np.array(model(toks)), plain)
    attach(model, memory, KNNConfig(k=1, mix=mix))
    assert model.layers[1].mlp.gate(memory.keys[1].astype(mx.bfloat16)).dtype == mx.bfloat16
    assert (dense_assignment(model, 1, memory.keys[1])[:, 2] > 0).all()
