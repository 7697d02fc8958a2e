"""Each mixing mode's expert weights against an independent NumPy reference (METHOD.md)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, Memory, attach, fingerprint
from tests.helpers import captured, dense_assignment, tokens
from tests.tiny_models import tiny_model


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dense(inds, w, n):
    out = np.zeros(inds.shape[:-1] + (n,))
    np.put_along_axis(out, inds, w, axis=-1)
    return out


def pi_softmax_topk(z, k=2):  # olmoe, norm_topk_prob=False
    p = np_softmax(z)
    inds = np.argsort(-p, -1)[..., :k]
    return dense(inds, np.take_along_axis(p, inds, -1), z.shape[-1])


def pi_topk_softmax(z, k=2):  # mixtral
    inds = np.argsort(-z, -1)[..., :k]
    return dense(inds, np_softmax(np.take_along_axis(z, inds, -1)), z.shape[-1])


def make_pi_grouped_sigmoid(gate):  # deepseek_v3
    bias = np.array(gate.e_score_correction_bias)
    n_group, topk_group, k = gate.n_group, gate.topk_group, gate.top_k
    scale = gate.routed_scaling_factor

    def pi(z):
        s = 1 / (1 + np.exp(-z))
        sel = (s + bias).reshape(*z.shape[:-1], n_group, -1)
        group_score = np.sort(sel, -1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, -1)[..., :topk_group]
        mask = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(mask, keep, True, -1)
        sel = np.where(mask[..., None], sel, 0.0).reshape(z.shape)
        inds = np.argsort(-sel, -1)[..., :k]
        w = np.take_along_axis(s, inds, -1)
        return dense(inds, w / w.sum(-1, keepdims=True) * scale, z.shape[-1])

    return pi


def inverse(scores, kind):
    scores = np.maximum(scores, 1e-30)
    return np.log(scores) if kind == "softmax" else np.log(scores) - np.log1p(-scores)


def reference(x, z, keys, values, tau, cfg, pi, score):
    """a_final for router inputs x [T, d] and own logits z [T, N], exact search in NumPy."""
    if cfg.similarity == "rbf":
        d = ((x[:, None, :] - keys[None]) ** 2).sum(-1)
        nn_idx = np.argsort(d, -1)[:, : cfg.k]
        sim = np.exp(-np.take_along_axis(d, nn_idx, -1) / tau)
    else:
        xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
        kn = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
        c = xn @ kn.T
        nn_idx = np.argsort(-c, -1)[:, : cfg.k]
        sim = np.clip(np.take_along_axis(c, nn_idx, -1), 0, 1)
    lam = np.clip(cfg.lambda_scale * sim.mean(-1), 0, 1)[:, None]
    w = (sim / sim.sum(-1, keepdims=True))[..., None]
    r = values[nn_idx]  # [T, K, N]
    if cfg.mix == "logits":
        return pi((1 - lam) * z + lam * (w * r).sum(1)), lam
    if cfg.mix == "topk":
        sc = (lambda a: 1 / (1 + np.exp(-a))) if score == "sigmoid" else np_softmax
        return pi(inverse((1 - lam) * sc(z) + lam * (w * sc(r)).sum(1), score)), lam
    return (1 - lam) * pi(z) + lam * (w * np.stack([pi(r[:, j]) for j in range(cfg.k)], 1)).sum(
        1
    ), lam


FAMILIES = {
    "olmoe": (lambda model: pi_softmax_topk, "softmax"),
    "mixtral": (lambda model: pi_topk_softmax, "softmax"),
    "deepseek_v3": (lambda model: make_pi_grouped_sigmoid(model.layers[2].mlp.gate), "sigmoid"),
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
@pytest.mark.parametrize("mix", ["union", "topk", "logits"])
@pytest.mark.parametrize("k,sim", [(1, "rbf"), (3, "rbf"), (3, "cosine")])
def test_mixing_matches_numpy_reference(arch, mix, k, sim):
    model = tiny_model(arch)
    make_pi, score = FAMILIES[arch]
    pi = make_pi(model)
    mem_cap = captured(model, tokens(11, (2, 16)))
    rng = np.random.default_rng(3)
    keys = {layer: x for layer, (x, _) in mem_cap.items()}
    values = {
        layer: mx.array(rng.normal(0, 2, z.shape).astype(np.float32))
        for layer, (_, z) in mem_cap.items()
    }
    memory = Memory(keys, values, fingerprint(model))
    query = captured(model, tokens(12, (1, 10)))
    layer = 2  # FAMILIES read layer 2's gate for the grouped-sigmoid map
    x, z = (np.array(a.astype(mx.float32)) for a in query[layer])
    tau = memory.bandwidth[layer] * 2.0
    cfg = KNNConfig(k=k, similarity=sim, mix=mix, bandwidth=tau, lambda_scale=1.5)
    attach(model, memory, cfg)
    got = dense_assignment(model, layer, query[layer][0])
    want, lam = reference(x, z, np.array(keys[layer]), np.array(values[layer]), tau, cfg, pi, score)
    assert (lam > 0.05).mean() > 0.5, "the test needs tokens that actually mix"
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
