"""Loading a model with mlx-lm and a memory beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import KNNConfig
from .memory.store import Memory
from .retrieval.attach import attach

PACKAGED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


def resolve_memory(spec: str | Path, model_path: str | Path | None = None) -> Path:
    """A memory given as a file path, a name packaged in ``<model>/memories/NAME.st``, or
    ``repo_id:file`` on the Hugging Face Hub. A name with a path separator is only ever a
    path (or a Hub reference), so no name leads out of ``<model>/memories/``."""
    spec = str(spec)
    if Path(spec).exists():
        return Path(spec)
    repo_id, _, filename = spec.partition(":")
    if filename and repo_id.count("/") == 1 and not repo_id.startswith(("/", ".")):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    if any(sep in spec for sep in ("/", "\\", os.sep)):
        raise FileNotFoundError(
            f"memory file {spec} does not exist (a name with a path separator is read as a "
            "path, not as a memory packaged in <model>/memories/)"
        )
    if not PACKAGED_NAME.fullmatch(spec):
        raise FileNotFoundError(
            f"memory '{spec}' not found: no such file, and not a packaged memory name "
            "(letters, digits, '.', '_' and '-', not starting with '.')"
        )
    where = ""
    if model_path is not None:
        memories = Path(model_path) / "memories"
        packaged = memories / f"{spec}.st"
        if packaged.exists():
            if not packaged.resolve().is_relative_to(memories.resolve()):
                raise FileNotFoundError(f"{packaged} links outside {memories}; refused")
            return packaged
        where = f" or {packaged}"
    raise FileNotFoundError(
        f"memory '{spec}' not found: no file {spec}{where}, and not a 'repo_id:file' Hub reference"
    )


def memory_name(spec: str) -> tuple[str, str]:
    """A memory's name and where to find it: ``NAME=spec`` -> (NAME, spec); a file, packaged
    name or ``repo_id:file`` alone is named by its file's stem."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, rest
    return Path(spec.rsplit(":", 1)[-1]).stem, spec


def load_memory(memory: str | Path, model: str | Path) -> Memory:
    """Find (see ``resolve_memory``) and read a memory for the model at ``model``."""
    from mlx_lm.utils import _download

    local = Path(model)
    model_dir = local if local.exists() else _download(str(model))
    return Memory.load(resolve_memory(memory, model_dir))


def load(
    path_or_hf_repo: str,
    memory: str | Path | Memory | None = None,
    config: KNNConfig | None = None,
    **load_kwargs,
):
    """``mlx_lm.load`` plus an attached memory. Returns (model, tokenizer)."""
    from mlx_lm.utils import load as mlx_load

    model, tokenizer = mlx_load(path_or_hf_repo, **load_kwargs)
    if memory is not None:
        if not isinstance(memory, Memory):
            memory = load_memory(memory, path_or_hf_repo)
        attach(model, memory, config)
    return model, tokenizer
