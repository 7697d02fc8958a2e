"""Files written so that nothing is lost: a temporary renamed over the target (a reader never
sees half a file), no overwrite without ``force``, and the temporaries a killed writer left
removed. Used by the memory file, build checkpoints, the hnsw cache and evaluation output."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp.*", re.ASCII)


def atomic_write(path: Path, write: Callable[[Path], None], force: bool, suffix: str) -> Path:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file. Refuses to
    replace an existing file unless ``force``. Temporaries a killed writer left are removed."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temporary_path(path: Path, suffix: str = "") -> Path:
    """Where this process writes ``path`` before renaming it (the pid names the writer)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries (``temporary_path``) in ``directory``, of the file ``name`` or of
    any, whose writing process no longer runs: what a killed write left behind."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for tmp in Path(directory).glob(".*.tmp*"):
        m = _TEMPORARY.fullmatch(tmp.name)
        if m and name in (None, m["name"]) and not _running(int(m["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
