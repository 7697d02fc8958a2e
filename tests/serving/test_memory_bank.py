"""MemoryBank: switching memories gives what attaching each one fresh gives, none gives the
plain model bit for bit, and request fields are checked."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe.config import KNNConfig
from mlx_knnmoe.loading import memory_name
from mlx_knnmoe.retrieval.attach import attach, detach
from mlx_knnmoe.serving.memory_bank import MemoryBank, RoutingChoice
from tests.conftest import MEMORY_PROMPT
from tests.helpers import force_expert, memory_from


@pytest.fixture(scope="module")
def setup(qwen_dir, tmp_path_factory):
    from mlx_lm import load

    model, tok = load(str(qwen_dir))
    toks = mx.array([tok.encode(MEMORY_PROMPT)])
    folder = tmp_path_factory.mktemp("bank")
    paths = {
        n: memory_from(model, toks, force_expert(e)).save(folder / f"{n}.st")
        for n, e in (("a", 0), ("b", 7))
    }
    bank = MemoryBank.load([str(paths["a"]), f"bee={paths['b']}"], str(qwen_dir), {"k": 2})
    return model, toks, paths, bank


def test_switching_equals_attaching_fresh_and_none_is_plain(setup):
    model, toks, paths, bank = setup
    plain = np.array(model(toks))
    fresh = {}
    for name, path in (("a", paths["a"]), ("bee", paths["b"])):
        attach(model, path, KNNConfig.from_memory_defaults(bank.memories[name].retrieval, k=2))
        fresh[name] = np.array(model(toks))
        detach(model)
    assert not np.allclose(fresh["a"], fresh["bee"])
    for name in ("bee", "a", None, "bee", None, "a"):
        bank.select(model, bank.choice({"memory": name or "none"}))
        got = np.array(model(toks))
        np.testing.assert_array_equal(got, plain if name is None else fresh[name])
    detach(model)


def test_names_defaults_and_request_fields(setup, qwen_dir):
    _, _, paths, bank = setup
    assert list(bank.memories) == ["a", "bee"] and bank.default.memory == "a"
    assert memory_name("x=some/path.st") == ("x", "some/path.st")
    assert memory_name("org/repo:med.st") == ("med", "org/repo:med.st")
    assert bank.choice({}) == RoutingChoice("a", bank.configs["a"])
    asked = bank.choice(
        {"memory": "bee", "knn_k": 3, "mix": "union", "skip_confident": "margin:0.5"}
    )
    assert (asked.config.k, asked.config.mix, asked.config.skip) == (3, "union", "margin")
    assert asked.config.skip_threshold == 0.5 and bank.configs["bee"].k == 2  # the flags' default
    assert bank.choice({"memory": "none"}) == RoutingChoice(None)
    with pytest.raises(ValueError, match="lambda_scale must be a number, got True"):
        bank.choice({"memory": "a", "lambda_scale": True})
    with pytest.raises(ValueError, match="lambda_scale must be finite and >= 0"):
        bank.choice({"memory": "a", "lambda_scale": -1})
    plain_default = MemoryBank.load([str(paths["a"])], str(qwen_dir), default="none")
    assert plain_default.choice({}) == RoutingChoice(None)
    with pytest.raises(ValueError, match="'none' is reserved"):
        MemoryBank.load([f"none={paths['a']}"], str(qwen_dir))
