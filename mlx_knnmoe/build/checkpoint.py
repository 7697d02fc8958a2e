"""Resumable builds: each finished batch is a file in ``<out>.partial/``, never recomputed.

A manifest records the settings the batches were made with; resuming with other settings is
refused with the fields that differ, since mixing batches of two builds would be silent
corruption.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx


class BuildCheckpoint:
    def __init__(self, directory: str | Path, settings: dict, restart: bool = False):
        self.dir = Path(directory)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        manifest = self.dir / "manifest.json"
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        if manifest.exists():
            found = json.loads(manifest.read_text())
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

    def done(self, index: int) -> bool:
        return self._path(index).exists()

    def completed(self) -> int:
        return len(list(self.dir.glob("batch-*.safetensors")))

    def save(self, index: int, arrays: dict[str, mx.array], meta: dict) -> None:
        path = self._path(index)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata={"meta": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, index: int) -> tuple[dict[str, mx.array], dict]:
        arrays, meta = mx.load(str(self._path(index)), return_metadata=True)
        return arrays, json.loads(meta["meta"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
