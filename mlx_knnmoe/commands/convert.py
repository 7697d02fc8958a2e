"""``mlx_knnmoe.convert``: a Hugging Face MoE checkpoint to an MLX model directory, as
``mlx_lm.convert`` does, plus router precision and packaged memories
(conversion/convert_model.py does the work).

    mlx_knnmoe.convert --hf-path Qwen/Qwen3-30B-A3B --mlx-path qwen3-4bit -q --memory med=med.st
"""

from __future__ import annotations

import click

from ..conversion.convert_model import DTYPES, Q_MODES, ROUTER_BITS, convert_model, parse_memories
from .options import COUNT, TRUST_REMOTE_CODE, choice_option, command, force_option


@command()
@click.option(
    "--hf-path", "--model", "hf_path", required=True, help="Checkpoint directory or Hub repo id."
)
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output directory.")
@click.option("-q", "--quantize", is_flag=True, help="Quantise the weights.")
@click.option("--q-bits", type=COUNT, help="Bits per weight (default: the mode's).")
@click.option("--q-group-size", type=COUNT, help="Group size (default: the mode's).")
@choice_option("--q-mode", Q_MODES, default="affine")
@choice_option(
    "--quant-predicate",
    ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"],
    "mlx-lm's mixed-bit recipe for the other layers (affine only).",
)
@choice_option(
    "--router-bits",
    ROUTER_BITS,
    default="8",
    help="Bits for the MoE routers when quantising, or 'float' to leave them unquantised. "
    "Routing is sensitive to router precision: a small change of the router logits changes "
    "which experts run, and a memory's corrections were made for the original router, so "
    "routers stay at 8 bits or more unless you ask otherwise.",
)
@choice_option(
    "--dtype",
    DTYPES,
    "dtype of the unquantised weights (default: the checkpoint's torch_dtype or dtype).",
)
@click.option(
    "--memory",
    "memories",
    multiple=True,
    metavar="NAME=FILE",
    help="Package a memory as <mlx-path>/memories/NAME.st (repeatable; FILE may be "
    "repo_id:file). It is checked against the converted model; `--memory NAME` then finds it.",
)
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@TRUST_REMOTE_CODE
@force_option("--mlx-path")
def cli(**kw) -> None:
    """Convert a Hugging Face MoE checkpoint to an MLX model directory.

    With -q, MoE routers are quantised to --router-bits (8) whatever --q-bits says: routing is
    sensitive to router precision.
    """
    try:
        memories = parse_memories(kw.pop("memories"))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--memory") from e
    out = convert_model(kw.pop("hf_path"), memories=memories, **kw)
    click.echo(f"[done] {out}")


main = cli

if __name__ == "__main__":
    main()
