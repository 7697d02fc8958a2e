"""Nothing in retrieval syncs to the host: a whole forward with a memory attached runs inside
``mx.compile`` (a host sync there raises) and matches the uncompiled logits."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_knnmoe import KNNConfig, attach, detach
from mlx_knnmoe.memory.compress import compress
from tests.helpers import memory_from, tokens
from tests.tiny_models import tiny_model


@pytest.mark.parametrize(
    "search, keys, mix, top",
    [
        ("exact", None, "topk", None),
        ("exact", "int8", "logits", None),
        ("ivf", "int8", "topk", None),
        ("ivf", "float32", "union", None),
        ("ivf", "int8", "topk", 4),  # top-m values, rebuilt per neighbour inside the graph
    ],
)
def test_compiled_forward_matches(search, keys, mix, top):
    model = tiny_model("olmoe")
    memory = memory_from(model, tokens(0, (8, 32)), lambda z: -z)
    memory = compress(
        memory, keys=keys, values="float16", ivf=8 if search == "ivf" else None, top_experts=top
    )
    toks = tokens(5, (2, 16))
    plain = np.array(model(toks))
    attach(model, memory, KNNConfig(search=search, nprobe=3, mix=mix), validate=False)
    eager = np.array(model(toks))  # builds the search indexes (outside compile)
    assert not np.allclose(eager, plain)  # the memory changes the routing
    compiled = mx.compile(lambda t: model(t))
    np.testing.assert_allclose(np.array(compiled(toks)), eager, rtol=1e-4, atol=1e-4)
    other = tokens(6, (2, 16))
    np.testing.assert_allclose(
        np.array(compiled(other)), np.array(model(other)), rtol=1e-4, atol=1e-4
    )
    detach(model)


def test_hnsw_needs_the_host():
    model = tiny_model("olmoe")
    memory = memory_from(model, tokens(0, (4, 32)))
    attach(model, memory, KNNConfig(search="hnsw"), validate=False)
    toks = tokens(5, (1, 8))
    mx.eval(model(toks))
    with pytest.raises((RuntimeError, ValueError)):
        mx.eval(mx.compile(lambda t: model(t))(toks))
    detach(model)
