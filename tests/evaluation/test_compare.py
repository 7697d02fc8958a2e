"""The comparison table: columns as wide as their content."""

from mlx_knnmoe.evaluation.compare import table


def ppl_summary(diff: float) -> dict:
    plain = {"name": "plain", "routing": None, "seconds": 1.25, "ppl": 22.0721}
    mem = {"name": "long-memory-name", "routing": {"mean_lambda": 0.5, "changed_share": 0.25}}
    mem.update(seconds=12.5, ppl=22.0721 + diff)
    mem["vs_plain"] = {"ppl": {"diff": diff, "ci95": [diff - 2.0, diff + 5.0]}}
    bucket = {"ppl_range": [1.0, 123.4], "examples": 10, "ppl": {"plain": 22.0, mem["name"]: 8.5}}
    return {"variants": [plain, mem], "buckets": [bucket]}


def test_columns_never_run_together_with_two_integer_digits():
    text = table(ppl_summary(24.3074), mc=False)
    lines = text.splitlines()
    assert lines[0].split() == ["variant", "ppl", "diff", "[95%", "CI]", "lambda", "changed"] + [
        "time",
        "s",
    ]
    mem_row = lines[2]
    assert "46.3795  +24.3074 [+22.3074, +29.3074]" in mem_row  # two spaces between columns
    assert mem_row.split()[:2] == ["long-memory-name", "46.3795"]
    # each column is right-aligned under its header: cells end where the header ends
    for header in ("ppl", "CI]", "lambda", "changed", "time s"):
        edge = lines[0].index(header) + len(header)
        assert mem_row[edge - 1] != " " and mem_row[edge : edge + 1] in ("", " "), header
    assert "long-memory-name" in lines[5] and lines[6].split() == ["1.0-123.4", "10", "22.0000"] + [
        "8.5000"
    ]


def test_negative_two_digit_difference_keeps_its_columns():
    text = table(ppl_summary(-24.3074), mc=False)
    cells = text.splitlines()[2].split("  ")
    assert "-24.3074 [-26.3074, -19.3074]" in [c.strip() for c in cells if c.strip()]
