"""A memory of the changed entries only (build/prune.py)."""

import mlx.core as mx
import numpy as np

from mlx_knnmoe.build.prune import changed_only, changed_rows
from tests.helpers import force_expert, memory_from


def test_only_entries_that_select_other_experts_are_kept(olmoe):
    toks = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])
    own = memory_from(olmoe, toks)  # values are the router's own logits: nothing changes
    forced = memory_from(olmoe, toks, force_expert(0))  # expert 0 and one other, everywhere
    keys, logits = {}, {}
    for layer in own.layers:
        z = own.logits[layer]
        rows = np.arange(z.shape[0])
        logits[layer] = mx.where(mx.array(rows % 2 == 0)[:, None], forced.logits[layer], z)
        keys[layer] = own.keys[layer]
        assert len(changed_rows(olmoe, layer, keys[layer], z)) == 0
    picked = {layer: changed_rows(olmoe, layer, keys[layer], logits[layer]) for layer in keys}
    layer = own.layers[0]
    z_sets = np.sort(np.argsort(-np.array(own.logits[layer]), axis=-1)[:, :2], axis=-1)
    expected = [r for r in range(0, len(z_sets), 2) if 0 not in z_sets[r]]
    assert expected and set(expected) <= set(picked[layer]) <= set(range(0, len(z_sets), 2))
    memory = type(own)(keys, logits, own.fingerprint, own.bandwidth)
    small = changed_only(olmoe, memory)
    for layer in small.layers:
        rows = picked[layer]
        assert np.array_equal(np.array(small.keys[layer]), np.array(keys[layer])[rows])
        assert np.array_equal(np.array(small.logits[layer]), np.array(logits[layer])[rows])
        assert small.bandwidth[layer] == memory.bandwidth[layer]
    assert changed_only(olmoe, own) is None
