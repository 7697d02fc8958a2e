"""Does a memory fit a model? Refuse another architecture or shape; warn about other routers."""

from __future__ import annotations

import warnings

import mlx.nn as nn

from ..arch.specs import moe_layers, pipeline_layers
from .file_format import MemoryData, MemoryMismatchError
from .fingerprint import fingerprint
from .probe import agreement_note


def validate_for_model(memory: MemoryData, model: nn.Module) -> list[str]:
    """Raise MemoryMismatchError naming every structural difference; warn about (and return)
    differences that still work: another top-k, other router weights (with how much the
    routing changed on the memory's probe keys).

    On a pipeline stage only the layers this rank runs are checked."""
    if not moe_layers(model):
        return []  # a pipeline stage without MoE layers: nothing is attached here
    stage = pipeline_layers(model)
    layers = [i for i in memory.layers if stage is None or i in stage]
    theirs = fingerprint(model)
    problems, notes = memory.mismatches(theirs, layers)
    if problems:
        raise MemoryMismatchError(
            f"{memory.where()} does not fit this model:\n  " + "\n  ".join(problems)
        )
    differ = memory.routers_differing(theirs)
    if differ:
        notes.append(
            f"router weights differ from those the memory was built with in layers "
            f"{differ} (for example a quantised or fine-tuned router); "
            + agreement_note(memory, model, differ)
        )
    for note in notes:
        warnings.warn(f"{memory.where()}: {note}", stacklevel=3)
    return notes
