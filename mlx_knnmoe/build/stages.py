"""The framework-free stages every ``build_memory`` runs around its gradient pass, shared by
the MLX builder (build/pipeline.py) and the PyTorch companion (pytorch/pipeline.py): the
output path checked, the dataset read, the re-capture passes, and the memory's build record
and retrieval defaults written once the memory exists."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ..config import BuildConfig, KNNConfig
from ..data.examples import Dataset, load_dataset
from .plan import BatchPlan, build_record

M = TypeVar("M")


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
    if config.pseudo_labels:
        raise ValueError(
            "pseudo_labels: generate the answers first (build.pseudo_labels."
            "pseudo_label_dataset) and pass its Dataset as the data"
        )
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


def recapture_passes(
    memory: M,
    passes: int,
    batches: int,
    capture: Callable[[M, Any], dict[int, Any]],
    detach: Callable[[], None],
    progress: bool = True,
) -> M:
    """Re-captured keys (build/recapture.py, pytorch/recapture.py): ``passes`` times,
    ``capture(memory, bar)`` attaches ``memory``, runs the ``batches`` batches and gives each
    layer's router inputs, one row per entry in the keys' dtype, which become the keys (values
    kept, bandwidth recalibrated). ``detach`` leaves the model without a memory at the end."""
    bar = tqdm(total=passes * batches, desc="re-capture keys", disable=not progress)
    try:
        for _ in range(passes):
            captured = capture(memory, bar)
            for layer, keys in memory.keys.items():
                if tuple(captured[layer].shape) != tuple(keys.shape):
                    raise ValueError(
                        f"layer {layer}: re-captured {captured[layer].shape[0]} keys for a "
                        f"memory of {keys.shape[0]} entries (the batches do not match it)"
                    )
            memory = type(memory)(captured, memory.logits, memory.fingerprint)
    finally:
        bar.close()
        detach()
    return memory
