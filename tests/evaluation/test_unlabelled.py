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
    seen = []
    losses = baselines.train(model, examples, 6, 1e-2, 4, every=1, on_step=seen.append)
    assert len(losses) == 6 and seen == [1, 2, 3, 4, 5, 6]
    stop_at_2 = baselines.train(model, examples, 6, 1e-2, 4, every=1, on_step=lambda s: s >= 2)
    assert len(stop_at_2) == 2  # on_step returning True ends training


def test_natural_fine_tuning_chooses_epochs_on_held_out_chunks(tmp_path):
    import json

    fine_tuning = load_script("examples/natural_text/fine_tuning.py")
    model_dir = fine_tuning.bench_run.BENCHES["natural"].model
    (tmp_path / "train.txt").write_text(
        "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(40))
    )
    replay = fine_tuning.replay_file(tmp_path, 3, tmp_path / "replay.jsonl")
    assert len(replay.read_text().splitlines()) == 3
    chunks = ["#define A 1\n#define B 2\n", "struct s { int a; };\n", "#include <x.h>\n"]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    chosen = fine_tuning.choose_epochs(model_dir, ref, replay, ref, "router", 2)
    assert chosen["per_epoch"] == 1  # 3 + 3 replay chunks in one batch of 32
    assert [e for e, _ in chosen["heldout_nll"]] == [0, 1, 2]
    best = min(v for _, v in chosen["heldout_nll"])
    near = [e for e, v in chosen["heldout_nll"] if v <= best + baselines.TOLERANCE]
    assert chosen["epochs"] == max(min(near), 1)  # at least one epoch is trained
    waited = fine_tuning.choose_epochs(model_dir, ref, None, replay, "full", 30, patience=1)
    scores = [v for _, v in waited["heldout_nll"]]
    assert len(scores) < 31  # stopped before the last epoch ...
    assert scores[-1] >= min(scores[:-1])  # ... at the first epoch without a new best
    assert all(b < a for a, b in zip(scores[:-2], scores[1:-1]))  # every earlier one was


def test_fine_tuning_setting_is_the_fewest_epochs_near_the_best_over_the_lr_grid(monkeypatch):
    fine_tuning = load_script("examples/natural_text/fine_tuning.py")
    scans = {  # lr -> held-out NLL after 0, 1, 2, ... epochs
        1e-4: [4.0, 3.9, 3.8, 3.7],
        1e-3: [4.0, 3.695, 3.69, 3.8],
        1e-2: [4.0, 4.2, 4.3],
    }

    def fake(model_dir, reference, replay, heldout, mode, epochs, lr=None):
        return {"per_epoch": 5, "lr": lr, "heldout_nll": list(enumerate(scans[lr]))}

    monkeypatch.setattr(fine_tuning, "choose_epochs", fake)
    monkeypatch.setitem(fine_tuning.LEARNING_RATES, "full", tuple(scans))
    chosen = fine_tuning.choose_setting(None, None, None, None, "full", 3)
    assert (chosen["lr"], chosen["epochs"]) == (1e-3, 1)  # 3.695 within 0.01 of 3.69
    scans.update({1e-4: [4.0, 4.1], 1e-3: [4.0, 4.05, 4.2]})  # training never helps
    chosen = fine_tuning.choose_setting(None, None, None, None, "full", 3)
    assert (chosen["lr"], chosen["epochs"]) == (1e-3, 1)  # the least harmful trained point
