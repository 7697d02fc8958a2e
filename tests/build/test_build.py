"""The builder's gradient step on free routing logits (the core of issue 3)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import BuildConfig, KNNConfig, Memory, attach, detach, fingerprint
from mlx_knnmoe.build.gradient import (
    first_step,
    free_logits_grad,
    free_logits_nll,
    optimise_batch,
    target_nll,
)
from mlx_knnmoe.build.gradient_context import auto_surrogate, dense_surrogate, token_scope
from mlx_knnmoe.build.plan import resolve_surrogate
from tests.helpers import captured, tokens
from tests.tiny_models import tiny_model


def own_logits(model, toks):
    cap = captured(model, toks[:, :-1])
    return [cap[layer][1].astype(mx.float32) for layer in sorted(cap)]


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_gradient_matches_finite_differences(arch):
    """Directional derivative along the gradient: float32 central difference, eps 1e-2.

    Measured relative errors were 0.05% to 2% (float32 noise in a loss of about 100); a sign
    error or a wrong scale in the gradient gives 100% or more.
    """
    model = tiny_model(arch)
    toks = tokens(0, (2, 10))
    mask = mx.ones(toks.shape)
    free = own_logits(model, toks)
    loss, grads = free_logits_grad(model, toks, mask, free)
    assert float(loss) == pytest.approx(float(target_nll(model, toks, mask)), rel=1e-6)
    norm = float(mx.sqrt(sum((g * g).sum() for g in grads)))
    eps = 1e-2

    def nll(e):
        shifted = [r + e * g / norm for r, g in zip(free, grads)]
        return float(free_logits_nll(model, toks, mask, shifted))

    fd = (nll(eps) - nll(-eps)) / (2 * eps)
    assert abs(fd - norm) / norm < 0.05, (fd, norm)


def test_renormalised_topk_gives_no_gradient_to_unselected_experts():
    model = tiny_model("qwen3_moe")  # norm_topk_prob=True
    toks = tokens(0, (2, 10))
    free = own_logits(model, toks)
    _, grads = free_logits_grad(model, toks, mx.ones(toks.shape), free)
    for r, g in zip(free, grads):
        unselected = np.argsort(-np.array(r), -1)[:, 2:]
        g = np.array(g)  # zero analytically; float32 rounding in the softmax leaves ~1e-9
        assert np.abs(np.take_along_axis(g, unselected, -1)).max() < 1e-6 * np.abs(g).max()
    model = tiny_model("olmoe")  # plain softmax top-k: unselected experts do get a gradient
    free = own_logits(model, toks)
    _, grads = free_logits_grad(model, toks, mx.ones(toks.shape), free)
    unselected = np.argsort(-np.array(free[0]), -1)[:, 2:]
    assert np.abs(np.take_along_axis(np.array(grads[0]), unselected, -1)).max() > 0


def test_loss_mask_limits_the_gradient_to_earlier_positions():
    model = tiny_model("mixtral")
    toks = tokens(0, (1, 10))
    mask = mx.zeros(toks.shape).at[:, 5].add(1.0)  # only token 5 is a target
    free = own_logits(model, toks)
    _, grads = free_logits_grad(model, toks, mask, free)
    for g in grads:  # router positions 0..4 can influence the prediction of token 5
        g = np.array(g)
        assert np.abs(g[:5]).max() > 0 and np.all(g[5:] == 0)


def test_one_step_lowers_the_nll_and_a_memory_transfers_it():
    model = tiny_model("mixtral")
    toks = tokens(3, (4, 16))
    mask = mx.ones(toks.shape)
    result = optimise_batch(model, toks, mask, mask, etas=[2.0])
    layers = sorted(result.keys)
    own = float(free_logits_nll(model, toks, mask, [result.logits[2.0][i] for i in layers]))
    assert own < result.loss_before
    memory = Memory(result.keys, result.logits[2.0], fingerprint(model))
    plain = float(target_nll(model, toks, mask))
    attach(model, memory, KNNConfig(mix="logits", k=1))
    with_memory = float(target_nll(model, toks, mask))
    detach(model)
    assert with_memory < plain, (with_memory, plain)


def test_padding_positions_are_not_stored():
    model = tiny_model("olmoe")
    toks = tokens(0, (2, 8))
    keep = mx.array([[1] * 8, [1] * 5 + [0] * 3])
    result = optimise_batch(model, toks, keep, keep, etas=[1.0])
    # inputs are positions 0..6; row 1 has real tokens 0..4, targets 1..4
    assert all(k.shape[0] == 7 + 5 for k in result.keys.values())
    assert result.targets == 7 + 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_first_step_gives_x_z_and_the_free_logit_gradient_in_one_pass(arch):
    model = tiny_model(arch)
    toks = tokens(1, (2, 9))
    mask = mx.ones(toks.shape)
    loss, x, z, grad = first_step(model, toks, mask)
    cap = captured(model, toks[:, :-1])
    free = [cap[layer][1].astype(mx.float32) for layer in sorted(cap)]
    loss2, grads = free_logits_grad(model, toks, mask, free)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    for layer, g in zip(sorted(cap), grads):
        np.testing.assert_allclose(np.array(x[layer]), np.array(cap[layer][0]), rtol=1e-6)
        np.testing.assert_allclose(np.array(z[layer]), np.array(free[sorted(cap).index(layer)]))
        np.testing.assert_allclose(np.array(grad[layer]), np.array(g), rtol=1e-4, atol=1e-7)


def test_steps_and_eta_grid():
    model = tiny_model("olmoe")
    toks = tokens(2, (2, 10))
    mask = mx.ones(toks.shape)
    one = optimise_batch(model, toks, mask, mask, etas=[0.5, 2.0])
    layer = sorted(one.keys)[0]
    z, r1, r2 = one.router_logits[layer], one.logits[0.5][layer], one.logits[2.0][layer]
    np.testing.assert_allclose(np.array(r2 - z), 4 * np.array(r1 - z), rtol=1e-4, atol=1e-6)
    two = optimise_batch(model, toks, mask, mask, etas=[2.0], steps=2)
    free = [one.logits[2.0][i] for i in sorted(one.keys)]
    _, grads = free_logits_grad(model, toks, mask, free)
    expected = free[0] - 2.0 * grads[0]
    np.testing.assert_allclose(np.array(two.logits[2.0][layer]), np.array(expected), atol=1e-5)


def test_token_scope_uses_only_each_positions_own_loss():
    model = tiny_model("qwen3_moe")
    toks = tokens(0, (1, 10))
    mask = mx.zeros(toks.shape).at[:, 5].add(1.0)  # token 5 is predicted at position 4
    plain = target_nll(model, toks, mask)
    with token_scope(model):
        loss, _, _, grad = first_step(model, toks, mask)
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)  # forward unchanged
    for g in grad.values():
        g = np.abs(np.array(g)).max(axis=-1)
        assert g[4] > 0 and np.all(np.delete(g, 4) == 0), g
    assert type(model.layers[0].self_attn.k_proj).__name__ == "Linear"  # restored


def test_dense_surrogate_reaches_unselected_experts_and_restores_the_model():
    model = tiny_model("qwen3_moe")  # renormalised top-2 of 8: unselected get no gradient
    toks = tokens(0, (2, 10))
    mask = mx.ones(toks.shape)
    before = model(toks)
    result = optimise_batch(model, toks, mask, mask, etas=[1.0], surrogate=8)
    layer = sorted(result.keys)[0]
    z = np.array(result.router_logits[layer])
    step = np.array(result.logits[1.0][layer]) - z
    unselected = np.argsort(-z, -1)[:, 2:]
    assert np.abs(np.take_along_axis(step, unselected, -1)).max() > 1e-4
    np.testing.assert_array_equal(np.array(model(toks)), np.array(before))
    with pytest.raises(ValueError, match="k' must be in 1..8"):
        with dense_surrogate(model, 9):
            pass


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("qwen3_moe", 8),  # softmax, top-k, renormalised: 4k capped at N = 8
        ("mixtral", 8),  # top-k then softmax
        ("gpt_oss", 8),
        ("granitemoe", 8),
        ("deepseek_v3", 8),  # sigmoid, renormalised
        ("glm4_moe", 8),
        ("olmoe", None),  # softmax top-k, not renormalised: unselected get a gradient
        ("qwen2_moe", None),
        ("deepseek_v2", None),
        ("phimoe", None),  # sparsemixer: no surrogate
    ],
)
def test_auto_surrogate_follows_the_routing_gradient(arch, expected):
    assert auto_surrogate(tiny_model(arch)) == expected


def test_auto_surrogate_is_4k_below_the_expert_count():
    model = tiny_model("qwen3_moe", num_experts=16)
    assert auto_surrogate(model) == 8  # k = 2
    assert resolve_surrogate("auto", lambda: auto_surrogate(model)) == 8
    assert BuildConfig(surrogate="off").surrogate is None
    assert BuildConfig(surrogate=0).surrogate is None
    assert BuildConfig(surrogate=3).surrogate == 3
    with pytest.raises(ValueError, match="dense surrogate"):
        BuildConfig(surrogate="all")
