"""Requests per second of ``mlx_knnmoe.server`` against plain ``mlx_lm.server`` on the same
model, both running in this process and measured in turns: a random qwen3_moe-shaped model,
two synthetic memories, and bursts of completion requests sent a few at a time."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..serving.memory_bank import MemoryBank
from ..serving.server import RunningServer, server_args, start_server
from .bench import QUICK, BenchModel, Log, markdown_table
from .inference import synthetic_memory
from .random_models import random_model, save_model_dir

# scenario -> the memory field of request i (None: no field, mlx-lm's own server)
SCENARIOS = {
    "mlx_lm.server": lambda i: None,
    "memory none": lambda i: "none",
    "one memory": lambda i: "a",
    "alternating a, b, none": lambda i: ("a", "b", "none")[i % 3],
}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def burst(server: RunningServer, memory_of, requests: int, concurrency: int, tokens: int) -> float:
    """Send ``requests`` completions, ``concurrency`` at a time; returns requests/s."""

    def one(i: int) -> None:
        body = {"prompt": f"Request {i}: the patient presents with", "max_tokens": tokens}
        if memory_of(i) is not None:
            body["memory"] = memory_of(i)
        # a fixed length: no request ends early at an end-of-text token
        body["logit_bias"] = {"0": -100.0}
        assert post(server.url, body)["usage"]["completion_tokens"] == tokens

    tic = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return requests / (time.perf_counter() - tic)


def run(
    model_size: BenchModel = QUICK,
    size: int = 2000,
    requests: int = 48,
    concurrency: int = 4,
    gen_tokens: int = 32,
    repeats: int = 3,
    log: Log = print,
) -> list[dict]:
    """Per scenario: median requests/s over ``repeats`` rounds and the median ratio to plain
    ``mlx_lm.server`` in the same round."""
    config = model_size.config()
    model = random_model(config, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_model_dir(model, config, Path(tmp) / "model"))
        specs = []
        for name, seed in (("a", 0), ("b", 1)):
            path = synthetic_memory(model, size, seed).save(Path(tmp) / f"{name}.st")
            specs.append(f"{name}={path}")
        del model
        args = server_args(model_dir, max_tokens=gen_tokens)
        servers = {
            "plain": start_server(args, None),
            "memories": start_server(args, MemoryBank.load(specs, model_dir, default=None)),
        }
        try:
            rounds = {name: [] for name in SCENARIOS}
            names = list(SCENARIOS)
            for r in range(repeats + 1):  # round 0 warms up (model load, first compiles)
                # each round starts with another scenario, so drift in machine load is shared
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    memory_of = SCENARIOS[name]
                    server = servers["plain" if memory_of(0) is None else "memories"]
                    rps = burst(server, memory_of, requests, concurrency, gen_tokens)
                    if r:
                        rounds[name].append(rps)
                        log(f"round {r}: {name}: {rps:.2f} requests/s")
        finally:
            for server in servers.values():
                server.close()
    plain = rounds["mlx_lm.server"]
    return [
        dict(
            scenario=name,
            requests_per_s=statistics.median(rps),
            ratio=statistics.median(x / p for x, p in zip(rps, plain)),
        )
        for name, rps in rounds.items()
    ]


def table(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        "server, requests | requests/s | vs mlx_lm.server",
        "{scenario} | {requests_per_s:.2f} | {ratio:.3f}",
    )
