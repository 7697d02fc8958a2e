"""The framework-free calibration rule (build/calibrate_rule.py) with fake scorers: what is
kept, what is switched off, the no-gain message, the scaled memory and the guard set."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

import mlx_knnmoe.build.calibrate_rule as rule
from mlx_knnmoe.config import BuildConfig
from mlx_knnmoe.memory.store import Memory

H_TARGETS, G_TARGETS = 40.0, 80.0
H_PLAIN = np.array([10.0, 12.0, 9.0, 11.0])
G_PLAIN = np.array([20.0, 21.0, 19.0, 22.0, 18.0, 20.0])
G_NOISE = np.array([0.3, -0.2, 0.1, -0.3, 0.2, -0.1])  # a memory's guard changes vary this much


def fake_score(heldout_gain, guard_rise):
    """A scorer whose memory is ``(eta, scales)``: each layer on (scale > 0) lowers every
    held-out row by ``heldout_gain(layer, scale, eta)`` and raises every guard row by
    ``guard_rise(layer, scale)`` (plus the same small noise)."""

    def score(memory):
        h, g = H_PLAIN.copy(), G_PLAIN.copy()
        if memory is not None:
            eta, scales = memory
            g = g + G_NOISE
            for layer, s in scales.items():
                e = eta[layer] if isinstance(eta, dict) else eta
                h = h - heldout_gain(layer, s, e) * (s > 0)
                g = g + guard_rise(layer, s) * (s > 0)
        return (h, H_TARGETS), (g, G_TARGETS)

    return score


def memory_for(eta, scales):
    return None if not any(s > 0 for s in scales.values()) else (eta, dict(scales))


def test_a_layer_that_raises_the_guard_beyond_noise_is_switched_off():
    """Layer 1 helps the held-out set most but raises every guard sequence by 1: switched
    off; layer 0 helps most at scale 1 and leaves the guard alone: kept at 1."""
    gain = {0: lambda s: 0.4 * (1 - (s - 1) ** 2), 1: lambda s: 2.0}
    score = fake_score(lambda layer, s, eta: gain[layer](s), lambda layer, s: float(layer == 1))
    c = rule.choose_settings(score, memory_for, 1.0, [0, 1])
    assert c["scales"] == {0: 1.0, 1: 0.0}
    assert c["eta"] == 1.0 and c["layer_eta"] is None
    # every setting with layer 1 on was refused by the guard, whatever it did on held-out data
    with_layer_1 = [t for t in c["trials"] if t["scales"][1] > 0]
    assert with_layer_1 and not any(t["guard_ok"] for t in with_layer_1)
    assert min(t["heldout_nll"] for t in with_layer_1) < c["heldout_nll"]
    assert c["heldout_nll"] == pytest.approx((H_PLAIN.sum() - 4 * 0.4) / H_TARGETS)
    assert c["plain_heldout_nll"] == pytest.approx(H_PLAIN.sum() / H_TARGETS)
    assert c["guard_sequences"] == len(G_PLAIN) and not rule.no_gain(c)


def test_a_memory_that_helps_nowhere_comes_back_with_every_scale_0():
    score = fake_score(lambda layer, s, eta: -0.5, lambda layer, s: 0.0)
    c = rule.choose_settings(score, memory_for, 2.0, [0, 1, 2], layer_eta=True)
    assert c["scales"] == {0: 0.0, 1: 0.0, 2: 0.0} and rule.no_gain(c)
    assert c["heldout_nll"] == c["plain_heldout_nll"]
    # 3 etas, then 3 other scales per layer; no layer is kept, so no per-layer eta
    assert len(c["trials"]) == 3 + 3 * 3
    assert [t["eta"] for t in c["trials"][:3]] == [2.0 * f for f in rule.ETA_FACTORS]
    assert c["layer_eta"] == {0: 2.0, 1: 2.0, 2: 2.0}


def test_layer_eta_moves_only_the_layer_it_helps():
    """The held-out gain of layer 0 is largest at eta 3, layer 1's at eta 1: eta 1 and 3
    tie for both layers together, eta 1 (tried first) stays, then layer 0 alone moves to 3."""
    best = {0: 3.0, 1: 1.0}
    score = fake_score(
        lambda layer, s, eta: 0.5 - 0.2 * (np.log(eta) - np.log(best[layer])) ** 2, lambda *a: 0.0
    )
    c = rule.choose_settings(score, memory_for, 1.0, [0, 1], layer_eta=True)
    assert c["eta"] == 1.0 and c["scales"] == {0: 1.0, 1: 1.0}
    assert c["layer_eta"] == {0: 3.0, 1: 1.0}


def test_the_no_gain_message_names_plain_and_the_best_trial():
    result = {
        "scales": {0: 0.0},
        "plain_heldout_nll": 2.5,
        "trials": [{"heldout_nll": 2.61}, {"heldout_nll": 2.4321}],
    }
    assert rule.no_gain_message(result) == (
        "calibrate: no setting lowered the held-out NLL without raising the guard's NLL beyond "
        "noise (plain 2.5000, best 2.4321); the memory would not help: rerun with "
        "--no-calibrate to keep it anyway"
    )
    assert rule.no_gain(result) and not rule.no_gain({**result, "scales": {0: 0.5}})


def test_scaled_drops_layers_at_0_and_scales_the_rest():
    keys = {i: mx.random.normal((4, 3), key=mx.random.key(i)) for i in (0, 2, 5)}
    logits = {i: mx.zeros((4, 6)) for i in keys}
    memory = Memory(keys, logits, {"num_experts": 6}, {0: 1.0, 2: 2.0, 5: 4.0})
    out = rule.scaled(memory, {0: 0.0, 2: 0.5})  # layer 5 not named: scale 1
    assert type(out) is Memory and out.layers == [2, 5]
    assert out.bandwidth == {2: 1.0, 5: 4.0} and out.keys[2] is keys[2]
    assert out.fingerprint == memory.fingerprint
    assert rule.scaled(memory, dict.fromkeys(keys, 0.0)) is None


def test_the_guard_set_is_the_file_or_text_sampled_from_the_start_token(tmp_path):
    calls = []

    def sample(start, count, length, seed):
        calls.append((start, count, length, seed))
        return rule.sampled_guard([[start] * length for _ in range(count)])

    for tokenizer, start in (
        (SimpleNamespace(bos_token_id=5, eos_token_id=7), 5),
        (SimpleNamespace(bos_token_id=None, eos_token_id=7), 7),
        (None, 0),
    ):
        examples = rule.guard_examples(tokenizer, BuildConfig(seed=3), sample)
        assert calls[-1] == (start, BuildConfig.guard_samples, rule.GUARD_LENGTH, 3)
        assert len(examples) == BuildConfig.guard_samples
        assert examples[0].loss_mask == [0] + [1] * (rule.GUARD_LENGTH - 1)
    more = rule.guard_examples(None, BuildConfig(guard_samples=40), sample)
    assert calls[-1][1] == 40 and len(more) == 40
    with pytest.raises(ValueError, match="guard_samples must be an integer >= 2"):
        BuildConfig(guard_samples=1)
    guard = tmp_path / "guard.txt"
    guard.write_text("one line\n\nanother line\n")
    tokenizer = SimpleNamespace(encode=lambda text, **k: [ord(c) for c in text])
    examples = rule.guard_examples(tokenizer, BuildConfig(guard=str(guard)), sample)
    assert len(calls) == 4  # the file, not the sampler
    assert [e.tokens[:3] for e in examples] == [[ord(c) for c in "one"], [ord(c) for c in "ano"]]


def test_guard_rows_batch_the_guard_in_order():
    assert rule.guard_rows(35) == [list(range(16)), list(range(16, 32)), [32, 33, 34]]
    assert rule.guard_rows(0) == []


def test_eta_candidates_follow_the_steps():
    assert rule.eta_candidates(BuildConfig(steps=1))(3.0) == [1.0, 3.0, 9.0]
    around = rule.eta_candidates(BuildConfig(steps=2, eta_grid=(0.3, 1.0, 3.0)))
    assert (
        around(1.0) == [0.3, 1.0, 3.0] and around(0.3) == [0.3, 1.0] and around(3.0) == [1.0, 3.0]
    )
