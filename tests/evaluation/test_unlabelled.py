"""examples/natural_text/unlabelled.py (pseudo-label rows) and the fine-tuning it reuses from
examples/reproduce/baselines.py."""

import mlx.core as mx
import numpy as np

from tests.helpers import load_script

unlabelled = load_script("examples/natural_text/unlabelled.py")
baselines = unlabelled.baselines


def test_chunks_split_at_the_line_boundary_nearest_the_middle():
    assert unlabelled.halves("a\nbb\nccc\ndd\n") == ("a\nbb\n", "ccc\ndd\n")
    assert unlabelled.halves("one two three four") == ("one two", " three four")
    first, second = unlabelled.halves("x" * 9)
    assert first + second == "x" * 9 and first


def test_baselines_train_steps_on_numpy_batches():
    from mlx_lm import load

    from mlx_knnmoe.bundled import DATA_DIR, MODEL_DIR
    from mlx_knnmoe.data.examples import load_dataset

    model, tokenizer = load(str(MODEL_DIR))
    path = DATA_DIR / "shift_ref_text.jsonl"
    examples = load_dataset(path, tokenizer, "completion", max_examples=4).examples
    baselines.prepare(model, "router", 0)
    before = np.array(model.layers[0].mlp.gate.weight)
    losses = baselines.train(model, examples, 1, 1e-2, 4)
    mx.eval(model.parameters())
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert not np.array_equal(before, np.array(model.layers[0].mlp.gate.weight))
