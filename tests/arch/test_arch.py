"""Routing maps restated in arch.py agree with what each mlx-lm block really does."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe.arch.specs import SPECS, moe_layers
from mlx_knnmoe.retrieval.attach import install
from tests.helpers import captured, dense_assignment, tokens
from tests.tiny_models import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)


def test_every_spec_has_a_tiny_model():
    assert set(SPECS) == set(TINY_CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_map_matches_block(arch):
    model = tiny_model(arch)
    cap = captured(model, tokens(1))
    routers = install(model)
    for layer, (x, z) in cap.items():
        rmap = routers[layer].routing
        inds, weights = rmap.select(z)
        ours = np.zeros((z.shape[0], rmap.n_experts), np.float32)
        np.put_along_axis(ours, np.array(inds), np.array(weights.astype(mx.float32)), axis=-1)
        theirs = dense_assignment(model, layer, x)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_dense_layers_are_skipped():
    # deepseek/glm: first_k_dense_replace=1; qwen3_moe: mlp_only_layers=[0]
    for arch in ("deepseek_v3", "qwen3_moe", "glm4_moe"):
        assert sorted(moe_layers(tiny_model(arch))) == [1, 2]


def test_unsupported_model_type_is_named():
    model = tiny_model("olmoe")
    model.args.model_type = "llama"
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        moe_layers(model)
