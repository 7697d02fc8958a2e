"""Fixtures of the build tests: a small question-answer dataset file."""

import json

import pytest

QUESTIONS = [
    ("What organ pumps blood?", "The heart."),
    ("What do lungs exchange?", "Oxygen and carbon dioxide."),
    ("Which cells carry oxygen?", "Red blood cells."),
    ("Where is insulin made?", "In the pancreas."),
    ("What does the liver store?", "Glycogen, among other things."),
    ("Which bone is the longest?", "The femur."),
    ("What filters the blood?", "The kidneys."),
    ("What protects the brain?", "The skull."),
]


@pytest.fixture
def data(tmp_path):
    """A jsonl file of the QUESTIONS as prompt/completion records."""
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": q, "completion": " " + a}) + "\n" for q, a in QUESTIONS)
    )
    return path
