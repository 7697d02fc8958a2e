"""examples/reproduce/report.py: the claim verdicts follow their stated rules."""

import pytest

from tests.helpers import load_script

report = load_script("examples/reproduce/report.py")


def row(name, text_ppl, mc_acc, plain_ppl=5.0, plain_acc=0.75, **extra):
    cells = {
        "shift_test_text": {
            "value": text_ppl,
            "plain": plain_ppl,
            "diff": text_ppl - plain_ppl,
            "ci95": [text_ppl - plain_ppl - 0.1, text_ppl - plain_ppl + 0.1],
        },
        "shift_test_mc": {
            "value": mc_acc,
            "plain": plain_acc,
            "diff": mc_acc - plain_acc,
            "ci95": [mc_acc - plain_acc - 0.01, mc_acc - plain_acc + 0.01],
        },
        "orig_test_text": {"value": 1.0, "plain": 1.0, "diff": 0.0, "ci95": [0.0, 0.0]},
        "orig_test_mc": {"value": 0.99, "plain": 0.99, "diff": 0.0, "ci95": [0.0, 0.0]},
    }
    return {"name": name, "seconds": 1.0, "splits": cells, **extra}


def verdicts(results):
    return {c.split(" (")[0]: v for c, v, _ in report.claims(results)}


@pytest.mark.parametrize(
    "k1, k3, expected",
    [
        ((3.0, 0.80), (3.5, 0.78), "reproduced"),
        ((3.0, 0.78), (3.5, 0.80), "mixed"),
        ((3.5, 0.78), (3.0, 0.80), "not reproduced"),
    ],
)
def test_k_verdict(k1, k3, expected):
    results = {"ablations": {"K": [row("K=1", *k1), row("K=3", *k3)]}}
    assert verdicts(results)["K = 1 neighbour is best"] == expected


def test_s_and_reference_size_verdicts():
    results = {
        "ablations": {
            "S": [row("S=1", 3.0, 0.78), row("S=3", 2.9, 0.78), row("S=10", 2.0, 0.80)],
            "reference size": [
                row("0", 5.0, 0.75, ref_examples=0),
                row("250", 4.0, 0.76, ref_examples=250),
                row("500", 3.2, 0.78, ref_examples=500),
                row("800", 3.0, 0.80, ref_examples=800),
            ],
        }
    }
    v = verdicts(results)
    assert v["S = 1 step suffices"] == "not reproduced"  # S=10: 20 ppl points, 2 acc points
    # 500 examples: 90% of the ppl gain, 60% of the accuracy gain
    assert v["0.5k-1k reference examples give most of the gain"] == "mixed"


def test_report_writes_tables_and_verdicts(tmp_path):
    results = {
        "main": [
            row("zero-shot", 5.0, 0.75),
            row("kNN-MoE topk", 3.0, 0.78),
            row("router fine-tuning", 2.0, 0.50),
            row("full fine-tuning", 1.0, 0.76),
        ],
        "ablations": {"similarity": [row("rbf", 3.0, 0.78), row("cosine", 2.5, 0.70)]},
    }
    out = tmp_path / "EXPERIMENTS.md"
    report.write_report(results, out, tmp_path / "figures")
    text = out.read_text()
    assert "| kNN-MoE topk | 3.000 (-2.000 [-2.100, -1.900])" in text
    v = verdicts(results)
    assert v["RBF similarity beats cosine"] == "mixed"
    assert v["Beats zero-shot"] == "reproduced"
    assert v["Better than router-only fine-tuning"] == "mixed"
    # ppl drop 40% vs 80% (outside 5%), accuracy +0.03 vs +0.01 (within): one of two
    assert v["Competitive with full SFT"] == "mixed"
    assert (tmp_path / "figures" / "main.png").exists()


def test_report_keeps_the_natural_text_sections(tmp_path):
    out = tmp_path / "EXPERIMENTS.md"
    out.write_text(f"# old\n\nreplaced\n\n{report.KEPT}\n\n## Natural text\nkept table\n")
    main = [row("zero-shot", 5.0, 0.75), row("kNN-MoE topk", 3.0, 0.78)]
    report.write_report({"main": main}, out, tmp_path / "figures")
    text = out.read_text()
    assert "replaced" not in text and text.count(report.KEPT) == 1
    assert text.endswith("## Natural text\nkept table\n")
