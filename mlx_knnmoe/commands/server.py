"""``mlx_knnmoe.server``: mlx-lm's OpenAI-compatible server with memories chosen per request
(serving/server.py does the work)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from ..serving.memory_bank import MemoryBank
from ..serving.server import server_args, start_server
from .options import (
    COUNT,
    TRUST_REMOTE_CODE,
    choice_option,
    command,
    knn_overrides,
    model_option,
    named_memories_option,
    retrieval_options,
    sampling_options,
)


@command()
@model_option
@named_memories_option(
    "memories",
    "A memory to serve (a file, a NAME packaged in <model>/memories/, or repo_id:file), "
    "named NAME or by its file; repeat for several. Loaded once, at start.",
)
@click.option(
    "--default-memory",
    help="The memory of requests that name none ('none': the plain model; default: the "
    "first --memory).",
)
@retrieval_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@sampling_options(max_tokens=512, note=" (a request's default)")
@click.option(
    "--decode-concurrency",
    type=COUNT,
    default=32,
    show_default=True,
    help="Requests decoded together in one batch (same memory only).",
)
@click.option("--prompt-concurrency", type=COUNT, default=8, show_default=True)
@click.option("--prompt-cache-size", type=COUNT, default=10, show_default=True)
@click.option(
    "--chat-template-args",
    type=json.loads,
    default="{}",
    metavar="JSON",
    help="JSON arguments for the tokenizer's apply_chat_template.",
)
@TRUST_REMOTE_CODE
@choice_option("--log-level", ["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO")
def cli(memories, default_memory, host, port, log_level, **kw) -> None:
    """An OpenAI-compatible server (mlx-lm's) whose requests pick a memory.

    Requests may add "memory" (a served NAME, or "none"), "knn_k", "mix", "lambda_scale" and
    "skip_confident" to the usual chat or completion fields; GET /v1/models lists the memories.
    """
    overrides = knn_overrides(kw)
    logging.basicConfig(level=log_level, format="%(asctime)s - %(levelname)s - %(message)s")
    default = "first" if default_memory is None else default_memory
    bank = MemoryBank.load(memories, kw["model"], overrides, default)
    args = server_args(**kw)
    server = start_server(args, bank, host, port)
    names = ", ".join(["none", *bank.memories])
    click.echo(
        f"serving {kw['model']} at {server.url}/v1 with memories: {names} "
        f"(default {bank.default.memory or 'none'}); Ctrl-C stops",
        err=True,
    )
    signal.signal(signal.SIGTERM, _stop)  # a service manager's stop: as Ctrl-C
    server.wait()
    # Stopped cleanly (threads joined). Skip the interpreter's teardown: MLX 0.32's native
    # destructors race with its stream threads there and abort about one exit in three.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


main = cli

if __name__ == "__main__":
    main()
