"""Selective retrieval: tokens the router is confident about keep their own routing."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, attach, detach, knn_stats, set_stats
from mlx_knnmoe.commands.options import knn_overrides
from mlx_knnmoe.retrieval.mixing import router_confident
from tests.helpers import captured, force_expert, memory_from, tokens
from tests.tiny_models import tiny_model


def test_confidence_signals_match_numpy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(8, 0.3), size=64).astype(np.float32)
    h = -(p * np.log(np.maximum(p, 1e-30))).sum(-1) / math.log(8)
    top = np.sort(p, -1)
    margin = top[:, -1] - top[:, -2]
    for t in (0.2, 0.5, 0.8):
        got = np.array(router_confident(mx.array(p), "entropy", t))
        np.testing.assert_array_equal(got, h < t)
        got = np.array(router_confident(mx.array(p), "margin", t))
        np.testing.assert_array_equal(got, margin > t)
    with pytest.raises(ValueError, match="skip must be one of"):
        KNNConfig(k=1, skip="perplexity")


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_skipping_all_tokens_is_the_plain_model_and_none_is_full_retrieval(arch):
    model = tiny_model(arch)
    toks = tokens(0)
    plain = np.array(model(toks))
    memory = memory_from(model, toks, force_expert(1))
    attach(model, memory, KNNConfig(k=1))
    full = np.array(model(toks))
    attach(model, memory, KNNConfig(k=1, skip="entropy", skip_threshold=1.01))  # everything is sure
    np.testing.assert_array_equal(np.array(model(toks)), plain)
    attach(model, memory, KNNConfig(k=1, skip="entropy", skip_threshold=0.0))  # nothing is sure
    np.testing.assert_array_equal(np.array(model(toks)), full)
    attach(model, memory, KNNConfig(k=1, skip="margin", skip_threshold=-1.0))  # every margin > -1
    np.testing.assert_array_equal(np.array(model(toks)), plain)
    detach(model)


def test_partial_skipping_zeroes_lambda_exactly_where_the_router_is_sure():
    model = tiny_model("olmoe")
    toks = tokens(0)
    memory = memory_from(model, toks, force_expert(1))
    z = captured(model, toks)[0][1].astype(mx.float32)
    sure = np.array(router_confident(mx.softmax(z, axis=-1), "margin", 0.05))
    assert 0 < sure.mean() < 1
    attach(model, memory, KNNConfig(k=1, skip="margin", skip_threshold=0.05))
    set_stats(model)
    model(toks)
    # the queries are the stored keys: lambda is 1 where retrieval runs, 0 where skipped
    assert knn_stats(model)[0]["mean_lambda"] == pytest.approx(1 - sure.mean(), abs=1e-6)
    detach(model)


def test_skip_flag_parses():
    kw = dict(knn_k=None, similarity=None, mix=None, lambda_scale=None, search=None)
    kw.update(bandwidth=None, skip_confident=("margin", 0.3))
    assert knn_overrides(dict(kw))["skip"] == "margin"
    assert knn_overrides(dict(kw))["skip_threshold"] == 0.3
