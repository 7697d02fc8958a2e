"""KNNConfig and BuildConfig refuse every out-of-range Python argument, naming it."""

import pytest

from mlx_knnmoe.config import BuildConfig, KNNConfig

BAD_RETRIEVAL = [
    ("k", 0, "k must be an integer >= 1"),
    ("k", 2.5, "k must be an integer >= 1"),
    ("k", True, "k must be an integer >= 1"),
    ("lambda_scale", -1.0, "lambda_scale must be finite and >= 0"),
    ("lambda_scale", float("nan"), "lambda_scale must be finite"),
    ("lambda_scale", "1", "lambda_scale must be a number"),
    ("bandwidth", 0.0, "bandwidth must be finite and > 0"),
    ("bandwidth", float("inf"), "bandwidth must be finite and > 0"),
    ("ef", 0, "ef must be an integer >= 1"),
    ("skip_threshold", float("nan"), "skip_threshold must be finite"),
    ("similarity", "dot", "similarity must be one of"),
]

BAD_BUILD = [
    ("eta", float("nan"), "eta must be finite and > 0"),
    ("eta", float("inf"), "eta must be finite and > 0"),
    ("eta", 0, "eta must be finite and > 0"),
    ("eta_grid", (float("nan"), 1.0), "eta grid value must be finite and > 0"),
    ("eta_grid", (), "the eta grid is empty"),
    ("eta_patience", -1, "eta_patience must be an integer >= 0"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("surrogate", -2, "dense surrogate k' must be an integer >= 1"),
    ("max_examples", -3, "max_examples must be an integer >= 1"),
    ("max_seq_len", 1, "max_seq_len must be an integer >= 2"),
    ("batch_tokens", 0, "batch_tokens must be an integer >= 1"),
    ("heldout", 1.5, "heldout must be a fraction in (0, 1)"),
    ("heldout", 0.0, "heldout must be a fraction in (0, 1)"),
    ("max_heldout", 0, "max_heldout must be an integer >= 1"),
    ("seed", 1.5, "seed must be an integer"),
]


@pytest.mark.parametrize("name, value, message", BAD_RETRIEVAL)
def test_knn_config_ranges(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KNNConfig(**{name: value})


@pytest.mark.parametrize("name, value, message", BAD_BUILD)
def test_build_config_ranges(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BuildConfig(**{name: value})
