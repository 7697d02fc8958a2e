"""Resumable builds: each finished batch is a file in ``<out>.partial/``, never recomputed.

A manifest records the settings the batches were made with; resuming with other settings is
refused with the fields that differ, since mixing batches of two builds would be silent
corruption. Each batch file also carries its own index, the hash of those settings and a
hash of every array, so a batch that was changed, truncated, copied over another or made
with other settings (a deleted manifest) is recomputed with a one-line notice, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import mlx.core as mx

from ..atomic_files import remove_stale_temporaries, temporary_path
from ..memory.schema import tensor_digest
from ..memory.store import Memory


class BuildCheckpoint:
    def __init__(self, directory: str | Path, settings: dict, restart: bool = False):
        self.dir = Path(directory)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        self.settings_sha256 = hashlib.sha256(
            json.dumps(self.settings, sort_keys=True).encode()
        ).hexdigest()
        manifest = self.dir / "manifest.json"
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        self.created = not self.dir.exists()  # removed again if the build fails before a batch
        remove_stale_temporaries(self.dir)
        found = _read_manifest(manifest)
        if found is not None:
            differ = sorted(
                k for k in set(found) | set(self.settings) if found.get(k) != self.settings.get(k)
            )
            if differ:
                detail = "; ".join(
                    f"{k}: partial has {found.get(k)!r}, now {self.settings.get(k)!r}"
                    for k in differ
                )
                raise ValueError(
                    f"{self.dir} holds a partial build with other settings ({detail}); "
                    "rerun with the same settings to resume, or pass --restart to discard it"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(manifest, json.dumps(self.settings, indent=1, sort_keys=True))

    def _path(self, index: int) -> Path:
        return self.dir / f"batch-{index:06d}.safetensors"

    def completed(self) -> int:
        return len(list(self.dir.glob("batch-*.safetensors")))

    def save(self, index: int, arrays: dict[str, mx.array], meta: dict) -> None:
        path = self._path(index)
        tmp = temporary_path(path, ".safetensors")
        metadata = {
            "meta": json.dumps(meta),
            "batch": str(index),
            "settings_sha256": self.settings_sha256,
            "sha256": json.dumps(_digests(arrays), sort_keys=True),
        }
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, index: int) -> tuple[dict[str, mx.array], dict] | None:
        """The saved batch, or None when there is none or it cannot be trusted (then a
        one-line notice says why and the caller recomputes it)."""
        path = self._path(index)
        if not path.exists():
            return None
        problem, found = _check_batch(path, index, self.settings_sha256)
        if problem is None:
            return found
        warnings.warn(f"{path}: {problem}; recomputing this batch", stacklevel=2)
        path.unlink(missing_ok=True)
        return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _digests(arrays: dict[str, mx.array]) -> dict[str, str]:
    return {
        name: tensor_digest(Memory.dtype_name(x), tuple(x.shape), Memory.to_numpy(x))
        for name, x in arrays.items()
    }


def _check_batch(path: Path, index: int, settings_sha256: str):
    """(what is wrong with a saved batch or None, (arrays, meta))."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        digests = json.loads(meta["sha256"])
        found = (arrays, json.loads(meta["meta"]))
        batch, settings = meta["batch"], meta["settings_sha256"]
    except Exception as e:  # unreadable, truncated, or written by an older version
        return f"unreadable or incomplete ({type(e).__name__}: {e})", None
    if batch != str(index):
        return f"holds batch {batch}, not batch {index}", None
    if settings != settings_sha256:
        return "was made with other build settings", None
    now = _digests(arrays)
    changed = sorted(k for k in set(digests) | set(now) if digests.get(k) != now.get(k))
    if changed:
        return f"arrays {changed} do not match their sha256", None
    return None, found


def _read_manifest(manifest: Path) -> dict | None:
    if not manifest.exists():
        return None
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        found = e
    if isinstance(found, dict):
        return found
    warnings.warn(
        f"{manifest}: unreadable ({found if isinstance(found, Exception) else 'not an object'}); "
        "writing a new one (each batch is still checked against the settings)",
        stacklevel=3,
    )
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
