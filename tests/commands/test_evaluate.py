"""evaluate: scoring against a hand check, bootstrap, buckets, the CLI and its JSON."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_knnmoe.build.pipeline import build_memory
from mlx_knnmoe.commands.evaluate import cli
from mlx_knnmoe.data.examples import load_dataset
from mlx_knnmoe.data.formats import multiple_choice
from mlx_knnmoe.evaluation.bootstrap import buckets, mean_of, paired_bootstrap, perplexity
from mlx_knnmoe.evaluation.scoring import score_choices, score_text

RECORDS = {
    "medmcqa": lambda i: {
        "question": f"Which nerve supplies muscle {i}?",
        "opa": "Median",
        "opb": "Ulnar",
        "opc": "Radial",
        "opd": "Axillary",
        "cop": i % 4,
    },
    "medqa": lambda i: {
        "sent1": f"A {30 + i}-year-old presents with fever. Next step?",
        "ending0": "Observe",
        "ending1": "Antibiotics",
        "ending2": "Surgery",
        "ending3": "Imaging",
        "label": (i + 1) % 4,
    },
    "mmlu": lambda i: {
        "question": f"What is {i} + {i}?",
        "choices": [str(2 * i), str(2 * i + 1), "0", "many"],
        "answer": i % 2,
    },
    "gpqa": lambda i: {
        "Question": f"Which particle mediates force {i}?",
        "Correct Answer": "Photon",
        "Incorrect Answer 1": "Gluon",
        "Incorrect Answer 2": "W boson",
        "Incorrect Answer 3": "Graviton",
    },
}


def write(path, fmt, n=6):
    path.write_text("".join(json.dumps(RECORDS[fmt](i)) + "\n" for i in range(n)))
    return path


def hand_loglik(model, tokenizer, prompt, choice):
    """log p(choice | prompt) from one forward over the joint text, summed by hand."""
    ctx = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + choice)
    assert full[: len(ctx)] == ctx
    logits = np.array(model(mx.array([full])).astype(mx.float32))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
    logp -= logits.max(-1)[:, None]
    return sum(logp[t - 1, full[t]] for t in range(len(ctx), len(full)))


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_choice_scores_match_a_hand_computation(olmoe_loaded, tmp_path, fmt):
    model, tokenizer = olmoe_loaded
    records = [RECORDS[fmt](i) for i in range(3)]
    items = [multiple_choice(r, fmt) for r in records]
    scores = score_choices(model, tokenizer, items, batch_tokens=64)
    for i, item in enumerate(items):
        hand = [hand_loglik(model, tokenizer, item.prompt, c) for c in item.choices]
        np.testing.assert_allclose(scores.loglik[i], hand, rtol=1e-4)
        assert scores.acc[i] == float(np.argmax(hand) == item.gold)
        chars = [len(c) - 1 for c in item.choices]  # " A" -> 1, " (A)" -> 3
        assert scores.acc_norm[i] == float(np.argmax(np.array(hand) / chars) == item.gold)


def test_text_perplexity_matches_a_hand_computation(olmoe_loaded, tmp_path):
    model, tokenizer = olmoe_loaded
    path = tmp_path / "t.txt"
    path.write_text("The heart pumps blood.\n\nThe lungs exchange gases with the blood.\n")
    examples = load_dataset(path, tokenizer, shuffle=False).examples
    nll, targets = score_text(model, examples, batch_tokens=32)
    for e, got in zip(examples, nll):
        logits = model(mx.array([e.tokens[:-1]])).astype(mx.float32)[0]
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        want = -sum(logp[t - 1, e.tokens[t]] for t in range(1, len(e.tokens)) if e.loss_mask[t])
        assert got == pytest.approx(want, rel=1e-5)
    assert list(targets) == [sum(e.loss_mask) for e in examples]


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = {"acc": rng.integers(0, 2, 200).astype(float)}
    same = paired_bootstrap(mean_of("acc"), a, a, samples=200)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0]}
    flipped = {"acc": a["acc"].copy()}
    flipped["acc"][:40] = 1.0  # strictly better on some examples, never worse
    d = paired_bootstrap(mean_of("acc"), a, flipped, samples=500)
    assert d["diff"] == pytest.approx(flipped["acc"].mean() - a["acc"].mean())
    assert 0 < d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    noise = {"acc": rng.integers(0, 2, 200).astype(float)}
    d = paired_bootstrap(mean_of("acc"), a, noise, samples=500)
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]
    ppl = {"nll": np.array([2.0, 4.0]), "targets": np.array([1.0, 3.0])}
    assert perplexity(ppl) == pytest.approx(np.exp(1.5))


def test_buckets_are_quantiles():
    values = np.arange(1, 13, dtype=float)
    which, ranges = buckets(values, 4)
    assert list(np.bincount(which)) == [3, 3, 3, 3]
    assert ranges[0][0] == 1.0 and ranges[-1][1] == 12.0


def test_cli_compares_plain_and_memories_with_json_and_refuses_overwrite(
    olmoe_loaded, olmoe_dir, tmp_path
):
    model, tokenizer = olmoe_loaded
    data = write(tmp_path / "med.jsonl", "medmcqa", n=8)
    memory = build_memory(model, tokenizer, data, eta=2.0, out=tmp_path / "med.st", progress=False)
    out = tmp_path / "res.json"
    args = ["--model", str(olmoe_dir), "--data", str(data), "--memory", str(memory.path)]
    args += ["--skip-confident", "margin:0.2", "--bootstrap", "200", "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "med+skip" in result.output and "prompt perplexity" in result.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "medmcqa" and doc["examples"] == 8 and doc["metric"] == "acc"
    names = [v["name"] for v in doc["variants"]]
    assert names == ["plain", "med", "med+skip"]
    plain, med, skip = doc["variants"]
    assert "vs_plain" not in plain and plain["routing"] is None
    for v in (med, skip):
        for m in ("acc", "acc_norm"):
            d = v["vs_plain"][m]
            assert d["diff"] == pytest.approx(v[m] - plain[m])
            assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        assert 0 <= v["routing"]["mean_lambda"] <= 1
    assert med["config"]["skip"] is None and skip["config"]["skip"] == "margin"
    assert skip["routing"]["mean_lambda"] <= med["routing"]["mean_lambda"]
    assert sum(b["examples"] for b in doc["buckets"]) == 8
    assert set(doc["buckets"][0]["acc"]) == set(names)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "pass --force" in again.output


def test_cli_text_perplexity(olmoe_dir, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"Sentence number {i}."}) + "\n" for i in range(5)))
    result = CliRunner().invoke(cli, ["--model", str(olmoe_dir), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output.splitlines()[0]


def test_plot(olmoe_dir, tmp_path):
    pytest.importorskip("matplotlib")
    data = write(tmp_path / "m.jsonl", "mmlu")
    png = tmp_path / "b.png"
    args = ["--model", str(olmoe_dir), "--data", str(data), "--plot", str(png)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"
