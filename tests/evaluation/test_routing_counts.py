"""Routing statistics of a padded evaluation batch count the real tokens only."""

import numpy as np
import pytest

from mlx_knnmoe.data.examples import Example
from mlx_knnmoe.evaluation.scoring import score_text
from mlx_knnmoe.retrieval.attach import attach, detach, knn_stats, set_stats
from tests.helpers import force_expert, memory_from, tokens


def stats_of(model, examples, batch_tokens):
    set_stats(model)
    score_text(model, examples, batch_tokens)
    stats = knn_stats(model)
    set_stats(model, False)
    return stats


def test_padding_positions_are_not_counted(olmoe):
    attach(olmoe, memory_from(olmoe, tokens(3, (2, 16)), force_expert(3)))
    try:
        rng = np.random.default_rng(0)
        lengths = [16, 5]
        examples = [
            Example(rng.integers(0, 300, n).tolist(), [0] + [1] * (n - 1), "") for n in lengths
        ]
        together = stats_of(olmoe, examples, batch_tokens=4096)  # one padded batch
        alone = stats_of(olmoe, examples, batch_tokens=16)  # one example per batch
    finally:
        detach(olmoe)
    real = sum(n - 1 for n in lengths)  # score_text feeds tokens[:, :-1]
    for layer, s in together.items():
        assert s["tokens"] == real == alone[layer]["tokens"]
        assert s["mean_lambda"] == pytest.approx(alone[layer]["mean_lambda"], abs=1e-5)
        assert s["changed_share"] == pytest.approx(alone[layer]["changed_share"], abs=1e-6)
