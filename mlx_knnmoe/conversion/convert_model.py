"""Hugging Face MoE checkpoints to MLX model directories: mlx-lm's own loading, quantisation
and saving (``mlx_lm.utils``) with the fix-ups transformers-5 checkpoints need (hf_fixups.py),
routers kept at 8 bits when quantising, and memories checked against the converted model and
packaged as ``<out>/memories/NAME.st``."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..arch.specs import get_path, moe_layers, spec_for
from ..loading import resolve_memory
from ..memory.fingerprint import fingerprint
from ..memory.probe import record_probe
from ..memory.store import Memory
from ..memory.validation import validate_for_model
from .hf_fixups import config_fixups, model_classes

Q_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")  # mlx-lm's quantisation modes
DTYPES = ("float16", "bfloat16", "float32")
ROUTER_BITS = ("2", "3", "4", "5", "6", "8", "float")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def router_predicate(
    model: nn.Module, bits: str, group_size: int | None = None, base: Callable | None = None
) -> Callable:
    """A ``quant_predicate`` for mlx-lm's ``quantize_model``: MoE routers at ``bits`` (affine)
    or left unquantised (``"float"``); every other layer as ``base`` says (default: the model's
    own ``quant_predicate``, else quantise)."""
    spec = spec_for(model)
    routers = {id(get_path(block, spec.gate)) for block in moe_layers(model).values()}
    base = base or getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):
        if id(module) not in routers:
            return base(path, module) if base is not None else True
        if bits == "float":
            return False
        for size in (group_size, 64, 32):
            if size and module.weight.shape[-1] % size == 0:
                return {"group_size": size, "bits": int(bits), "mode": "affine"}
        return False  # no group size divides the router's input: leave it in float

    return predicate


def parse_memories(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``NAME=FILE`` pairs; names become ``memories/NAME.st``."""
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not source:
            raise ValueError(f"--memory {spec!r}: expected NAME=FILE")
        if not _NAME.match(name) or name.endswith(".st"):
            raise ValueError(
                f"--memory {spec!r}: NAME must be letters, digits, '_', '-' or '.', "
                "without the .st suffix"
            )
        if name in out:
            raise ValueError(f"--memory: the name {name!r} is given twice")
        out[name] = source
    return out


def _cast(model: nn.Module, dtype: str | None) -> None:
    """Cast floating weights to ``dtype`` as mlx-lm's conversion does (its cast_predicate)."""
    from mlx.utils import tree_map_with_path

    if dtype not in DTYPES:
        return
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, v):
        return v.astype(target) if keep(path) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))


def _add_probes(memories: dict[str, Memory], source: nn.Module) -> None:
    """Give each memory without a router probe one from ``source`` (the model before
    quantisation) when its routers are those the memory was built with."""
    fp = None
    for memory in memories.values():
        if not memory.probe and not memory.projection:
            fp = fp or fingerprint(source)
            if not memory.routers_differing(fp):
                record_probe(memory, source)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)


def convert_model(
    hf_path: str,
    mlx_path: str | Path = "mlx_model",
    *,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | None = None,
    router_bits: str = "8",
    dtype: str | None = None,
    memories: dict[str, str] | None = None,
    force: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a Hugging Face checkpoint (directory or Hub id) to an MLX model directory.

    ``memories`` maps NAME to a memory (file or ``repo_id:file``) packaged as
    ``<mlx_path>/memories/NAME.st`` after ``validate_for_model`` against the converted model.
    Nothing is written unless everything succeeds; an existing ``mlx_path`` is replaced only
    with ``force``.
    """
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import (
        _download,
        load_config,
        load_model,
        load_tokenizer,
        quantize_model,
        save,
    )

    out = Path(mlx_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to replace it")
    if str(router_bits) not in ROUTER_BITS:
        raise ValueError(f"router_bits must be one of {ROUTER_BITS}, got {router_bits!r}")
    src = _download(hf_path, revision=revision)
    fix = config_fixups(load_config(src))
    for note in fix.notes:
        log(f"[fix-up] {note}")
    for message in fix.warnings:
        warnings.warn(message, stacklevel=2)
    model, config = load_model(
        src,
        lazy=True,
        model_config=fix.patch,
        get_model_classes=model_classes,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(
        src, {"trust_remote_code": trust_remote_code}, eos_token_ids=config.get("eos_token_id")
    )
    packaged = {name: Memory.load(resolve_memory(spec)) for name, spec in (memories or {}).items()}
    _add_probes(packaged, model)  # a memory built on the checkpoint's dtype
    _cast(model, dtype or config.get("torch_dtype"))
    _add_probes(packaged, model)  # or on the converted dtype
    if quantize:
        base = None
        if quant_predicate is not None:
            base = mixed_quant_predicate_builder(quant_predicate, model, q_group_size)
        predicate = router_predicate(model, str(router_bits), q_group_size, base)
        model, config = quantize_model(
            model, config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate
        )
    for memory in packaged.values():
        validate_for_model(
            memory, model
        )  # refuses another model; warns (with how much) on other routers
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, hf_path if revision is None else src, model, tokenizer, config)
        for name, memory in packaged.items():
            memory.save(tmp / "memories" / f"{name}.st")
            log(f"[memory] {name}: {memory.num_entries()} entries -> memories/{name}.st")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
