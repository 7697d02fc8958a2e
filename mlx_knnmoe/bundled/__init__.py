"""The bundled demo model and its data splits (see examples/bundled/ for how they are made)."""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent
MODEL_DIR = BUNDLED / "model"
DATA_DIR = BUNDLED / "data"
