"""mlx_knnmoe.convert: Hugging Face MoE checkpoints to MLX, and memory compression.

``model``: mlx-lm's own loading, quantisation and saving (``mlx_lm.utils``) with the fix-ups
transformers-5 checkpoints need (hf_fixups.py), routers kept at 8 bits when quantising, and
memories checked against the converted model and packaged as ``<out>/memories/NAME.st``.
``memory``: key precision, PCA and pruning (compress.py).

    mlx_knnmoe.convert model --hf-path Qwen/Qwen3-30B-A3B --mlx-path qwen3-4bit -q \\
        --memory med=med.st
    mlx_knnmoe.convert memory med.st med-small.st --keys int8 --pca 256 --prune --model qwen3
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn

from .arch import get_path, moe_layers, spec_for
from .compress import KEY_FORMATS, compress
from .hf_fixups import config_fixups, model_classes
from .loading import load_memory, resolve_memory
from .memory import Memory, fingerprint
from .probe import record_probe

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
    ``<mlx_path>/memories/NAME.st`` after ``Memory.validate`` against the converted model.
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
        memory.validate(model)  # refuses another model; warns (with how much) on other routers
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


def _echo_warnings(fn: Callable, *args, **kwargs):
    """Run ``fn``; print its warnings as ``warning: ...`` lines; click errors for bad input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(*args, **kwargs)
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Convert Hugging Face MoE checkpoints to MLX (model) and compress memories (memory)."""


@cli.command("model")
@click.option(
    "--hf-path", "--model", "hf_path", required=True, help="Checkpoint directory or Hub repo id."
)
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output directory.")
@click.option("-q", "--quantize", is_flag=True, help="Quantise the weights.")
@click.option("--q-bits", type=int, default=None, help="Bits per weight (default: the mode's).")
@click.option("--q-group-size", type=int, default=None, help="Group size (default: the mode's).")
@click.option("--q-mode", type=click.Choice(Q_MODES), default="affine", show_default=True)
@click.option(
    "--quant-predicate",
    type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]),
    default=None,
    help="mlx-lm's mixed-bit recipe for the other layers (affine only).",
)
@click.option(
    "--router-bits",
    type=click.Choice(ROUTER_BITS),
    default="8",
    show_default=True,
    help="Bits for the MoE routers when quantising, or 'float' to leave them unquantised. "
    "Routing is sensitive to router precision: a small change of the router logits changes "
    "which experts run, and a memory's corrections were made for the original router, so "
    "routers stay at 8 bits or more unless you ask otherwise.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="dtype of the unquantised weights (default: the checkpoint's torch_dtype or dtype).",
)
@click.option(
    "--memory",
    "memories",
    multiple=True,
    metavar="NAME=FILE",
    help="Package a memory as <mlx-path>/memories/NAME.st (repeatable; FILE may be "
    "repo_id:file). It is checked against the converted model; `--memory NAME` then finds it.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own code.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path.")
def model_command(**kw) -> None:
    """Convert a Hugging Face MoE checkpoint to an MLX model directory.

    With -q, MoE routers are quantised to --router-bits (8) whatever --q-bits says: routing is
    sensitive to router precision.
    """
    try:
        memories = parse_memories(kw.pop("memories"))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--memory") from e
    out = _echo_warnings(convert_model, kw.pop("hf_path"), memories=memories, **kw)
    click.echo(f"[done] {out}")


@cli.command("memory")
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--keys",
    type=click.Choice(KEY_FORMATS),
    default=None,
    help="Store keys in this precision (int8: one scale per row).",
)
@click.option(
    "--pca",
    type=int,
    default=None,
    metavar="DIM",
    help="Project keys to DIM dimensions (PCA fitted on each layer's keys, stored in the file "
    "and applied to queries; the RBF bandwidth is recalibrated).",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Drop entries whose stored logits pick the same top-k experts as the router (--model).",
)
@click.option(
    "--model",
    default=None,
    help="The model the memory was built with: checks the memory, adds a router probe if it "
    "has none (so a quantised model can later say how far its routers are), needed by --prune.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def memory_command(source: str, out: Path, keys, pca, prune, model, force) -> None:
    """Compress a memory (SOURCE: a file, a NAME packaged in --model, or repo_id:file)."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to replace it")
    if prune and model is None:
        raise click.UsageError("--prune needs --model (the model the memory was built with)")

    def run():
        from mlx_lm.utils import load

        model_obj = load(model, lazy=True)[0] if model else None
        memory = load_memory(source, model) if model else Memory.load(resolve_memory(source))
        small = compress(memory, keys=keys, pca=pca, prune=prune, model=model_obj)
        small.save(out, force=force)
        return memory, small

    memory, small = _echo_warnings(run)
    click.echo(describe(memory, small))


def describe(before: Memory, after: Memory) -> str:
    """What a compression did: size, entries, PCA variance kept."""
    size = before.path.stat().st_size, after.path.stat().st_size
    lines = [
        f"{before.path} -> {after.path}: {size[0] / 1e6:.2f} MB -> {size[1] / 1e6:.2f} MB "
        f"({size[1] / size[0]:.1%})"
    ]
    for layer in before.layers:
        n = after.num_entries().get(layer, 0)
        line = f"  layer {layer}: {before.num_entries()[layer]} -> {n} entries"
        kept = after.compression.get("pca", {}).get("variance_kept", {}).get(str(layer))
        if kept is not None:
            line += f", PCA {after.keys[layer].shape[1]} dims keep {kept:.1%} of the variance"
        lines.append(line)
    return "\n".join(lines)


main = cli

if __name__ == "__main__":
    main()
