"""Data-parallel memory builds with ``mlx.distributed``.

Batches are dealt round-robin to the ranks (they are sorted longest first, so this balances
the work); each rank computes its own, then every rank's rows are gathered and put back in
global batch order, so the memory equals a single-process build entry for entry. A failure
on any rank is shared through one ``all_sum`` before the gather, so no rank waits forever.
``launch`` runs the command under ``mlx.launch`` and fails with the failing rank's error
(``mlx.launch`` itself exits 0 when ranks fail).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

FAULT_ENV = "MLX_KNNMOE_FAIL_RANK"  # fault injection for tests: this rank raises


@functools.cache
def world():
    """The distributed group when this process is one of several ranks, else None (the group
    is made once: a second ``init`` would set up the backend's connections again)."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def shard(n_batches: int, group=None, rank: int | None = None) -> list[int]:
    """The batch indices ``rank`` (default: this process's rank) computes."""
    if group is None:
        return list(range(n_batches))
    return list(range(group.rank() if rank is None else rank, n_batches, group.size()))


def maybe_inject_fault(group) -> None:
    rank = group.rank() if group is not None else 0
    if os.environ.get(FAULT_ENV) == str(rank):
        raise RuntimeError(f"fault injected on rank {rank} ({FAULT_ENV})")


def agree_all_ok(group, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (the failing rank re-raises its own error)."""
    failed = mx.distributed.all_sum(mx.array([0.0 if error is None else 1.0]), group=group)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"{int(failed.item())} other rank(s) failed; see their errors")


def gather_rows(arrays: dict[str, mx.array], group) -> list[dict[str, mx.array]]:
    """Every rank's ``arrays`` (same names and trailing shapes, any number of rows each)."""
    names = sorted(arrays)
    rows = mx.array([arrays[names[0]].shape[0]], dtype=mx.int32)
    counts = mx.distributed.all_gather(rows, group=group).tolist()
    longest = max(counts)
    out = [{} for _ in counts]
    for name in names:
        a = arrays[name]
        pad = mx.zeros((longest - a.shape[0], *a.shape[1:]), dtype=a.dtype)
        # evaluated here: a collective left in the lazy graph would run later, on one rank
        every = mx.distributed.all_gather(mx.concatenate([a, pad]), group=group)
        mx.eval(every)
        for r, n in enumerate(counts):
            out[r][name] = every[r * longest : r * longest + n]
    return out


def launch(argv: list[str], ranks: int, hosts: str, backend: str) -> None:
    """Run the build_memory command with ``argv`` on ``ranks`` ranks; raise with the
    output of every rank that did not finish."""
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    status = Path(tempfile.mkdtemp(prefix="knnmoe-ranks-"))
    entry = Path(__file__).with_name("rank_main.py")
    cmd = [launcher, "--backend", backend, "--hosts", hosts, "-n", str(ranks)]
    cmd += ["--python", sys.executable, str(entry), *argv, "--rank-status", str(status)]
    try:
        subprocess.run(cmd, check=False)
        n_ranks = ranks * len(hosts.split(","))
        missing = [r for r in range(n_ranks) if not (status / f"rank{r}.ok").exists()]
        if missing:
            errors = [
                f"rank {r}: {(status / f'rank{r}.err').read_text().strip()}"
                if (status / f"rank{r}.err").exists()
                else f"rank {r}: exited without a result"
                for r in missing
            ]
            raise RuntimeError("distributed build failed:\n" + "\n".join(errors))
    finally:
        shutil.rmtree(status, ignore_errors=True)


def report_status(status_dir: str | None, group, error: BaseException | None) -> None:
    """Leave this rank's outcome where ``launch`` looks for it."""
    if status_dir is None:
        return
    rank = group.rank() if group is not None else 0
    path = Path(status_dir) / (f"rank{rank}.err" if error else f"rank{rank}.ok")
    path.write_text(f"{type(error).__name__}: {error}" if error else "ok")
