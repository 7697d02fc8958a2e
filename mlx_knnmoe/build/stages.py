"""The framework-free stages every ``build_memory`` runs around its gradient pass, shared by
the MLX builder (build/pipeline.py) and the PyTorch companion (pytorch/pipeline.py): the
output path checked, the dataset read, and the memory's build record and retrieval defaults
written once the memory exists."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import BuildConfig, KNNConfig
from ..data.examples import Dataset, load_dataset
from .plan import BatchPlan, build_record


def output_path(out: str | Path | None, force: bool) -> Path | None:
    """``out`` as a Path (None: nothing is saved); an existing file is refused without
    ``force``."""
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    return out


def read_dataset(data: str | Path | Dataset, tokenizer, config: BuildConfig) -> Dataset:
    """``data`` itself when it is a Dataset, else the file read with the build's format,
    example cap, sequence length and seed."""
    if isinstance(data, Dataset):
        return data
    return load_dataset(
        data,
        tokenizer,
        config.format,
        max_examples=config.max_examples,
        max_seq_len=config.max_seq_len,
        seed=config.seed,
    )


def record_build(
    memory: Any,
    config: BuildConfig,
    dataset: Dataset,
    plan: BatchPlan,
    retrieval: KNNConfig,
    started: float,
    **chosen,
) -> None:
    """Write the build record (``build_record``: the settings, ``chosen``'s eta, tuning,
    surrogate, loss and extras, entries per layer, seconds since ``started`` by
    ``time.perf_counter``) and the retrieval defaults into ``memory``'s metadata."""
    memory.build = build_record(
        config,
        dataset,
        entries=memory.num_entries()[memory.layers[0]],
        seconds=time.perf_counter() - started,
        heldout_examples=plan.heldout,
        **chosen,
    )
    memory.retrieval = retrieval.record()
