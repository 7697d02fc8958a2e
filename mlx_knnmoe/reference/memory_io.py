"""The memory file in torch: the format of ``mlx_knnmoe.memory`` read and written with the
``safetensors`` package, so a memory built on either side loads on the other.

Tensors ``layers.{l}.keys`` [M, d] and ``layers.{l}.logits`` [M, N] (optional
``key_scales``, ``projection``, ``probe_keys``, ``probe_logits``); string metadata
``format``, ``version``, ``fingerprint``, ``bandwidth``, ``build``, ``retrieval``,
``compression`` (JSON values). The fingerprint hashes each router's parameters by name as
MLX does (``weight``, ``bias``, ``e_score_correction_bias``), so an MLX model converted from
the same checkpoint at the same precision has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .routing import model_type, moe_blocks, own_router, routing_map, spec_for

FORMAT = "mlx_knnmoe.memory"
VERSION = 2
_TENSOR = re.compile(
    r"^layers\.(\d+)\.(keys|logits|key_scales|projection|probe_keys|probe_logits)$"
)
_META = ("fingerprint", "bandwidth", "build", "retrieval", "compression")


class MemoryFormatError(ValueError):
    """The file is not a readable kNN-MoE memory."""


class MemoryMismatchError(ValueError):
    """The memory was built for a different model."""


def router_hash(router: nn.Module) -> str:
    h = hashlib.sha256()
    named = dict(router.named_parameters(recurse=False))
    named.update(router.named_buffers(recurse=False))
    for name in sorted(named):
        value = named[name].detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        arr = value.cpu().numpy()
        h.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict:
    """What a memory must agree with: architecture, sizes, MoE layers, router weights."""
    spec = spec_for(model)
    blocks = moe_blocks(model)
    rmap = routing_map(next(iter(blocks.values())), spec)
    return {
        "model_type": model_type(model),
        "hidden_size": int(model.config.hidden_size),
        "num_experts": rmap.n_experts,
        "top_k": rmap.top_k,
        "moe_layers": sorted(blocks),
        "router_hash": {str(i): router_hash(own_router(b, spec)) for i, b in blocks.items()},
    }


def calibrate_bandwidth(keys: torch.Tensor, sample: int = 1024, seed: int = 0) -> float:
    """RBF tau: median squared distance from a key to its nearest distinct key (keys closer
    than 1e-4 of the median squared norm are duplicates), as ``mlx_knnmoe.memory``."""
    k = keys.detach().float().cpu().numpy()
    if len(k) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(k), size=min(sample, len(k)), replace=False)
    q = k[rows]
    sq = (k * k).sum(1)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ k.T + sq[None, :]
    d2[np.arange(len(rows)), rows] = np.inf
    d2[d2 <= 1e-4 * np.median(sq)] = np.inf
    nearest = d2.min(1)
    distinct = nearest[np.isfinite(nearest)]
    return float(np.median(distinct)) if len(distinct) else 1.0


@dataclass
class Memory:
    keys: dict[int, torch.Tensor]  # [M, d] per layer (in search space where projected)
    logits: dict[int, torch.Tensor]  # [M, N] optimised router logits
    fingerprint: dict
    bandwidth: dict[int, float] = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)
    path: Path | None = None
    projection: dict[int, torch.Tensor] = field(default_factory=dict)  # [D, d]
    probe: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    compression: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.keys) != set(self.logits):
            raise MemoryFormatError(
                f"layers with keys {sorted(self.keys)} differ from layers with logits "
                f"{sorted(self.logits)}"
            )
        for layer in self.keys:
            k, v = self.keys[layer], self.logits[layer]
            if k.ndim != 2 or v.ndim != 2 or k.shape[0] != v.shape[0]:
                raise MemoryFormatError(
                    f"layer {layer}: keys {tuple(k.shape)} and logits {tuple(v.shape)} must be "
                    "[M, d] and [M, N] with the same M"
                )
        if not self.bandwidth:
            self.bandwidth = {layer: calibrate_bandwidth(k) for layer, k in self.keys.items()}

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def num_entries(self) -> dict[int, int]:
        return {layer: int(self.keys[layer].shape[0]) for layer in self.layers}

    @property
    def version(self) -> int:
        return 2 if self.projection or self.compression.get("keys") == "int8" else 1

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically; refuse to replace an existing file unless ``force``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.name.startswith("model") and path.name.endswith(".safetensors"):
            raise ValueError(f"{path}: mlx-lm would load a file named model*.safetensors")
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        metadata = {
            "format": FORMAT,
            "version": str(self.version),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "bandwidth": json.dumps({str(k): float(v) for k, v in self.bandwidth.items()}),
            "build": json.dumps(self.build, sort_keys=True),
            "retrieval": json.dumps(self.retrieval, sort_keys=True),
            "compression": json.dumps(self.compression, sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
        try:
            save_file(self._tensors(), str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path
        return path

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.layers:
            name = f"layers.{layer}"
            keys = self.keys[layer].detach()
            if self.compression.get("keys") == "int8":
                keys, out[f"{name}.key_scales"] = quantize_rows(keys)
            out[f"{name}.keys"] = keys
            out[f"{name}.logits"] = self.logits[layer].detach()
            if layer in self.projection:
                out[f"{name}.projection"] = self.projection[layer]
            if layer in self.probe:
                out[f"{name}.probe_keys"], out[f"{name}.probe_logits"] = self.probe[layer]
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Memory":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            raise MemoryFormatError(f"{path}: not a readable safetensors file ({e})") from e
        if meta.get("format") != FORMAT:
            raise MemoryFormatError(
                f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
            )
        if meta.get("version") not in [str(v) for v in range(1, VERSION + 1)]:
            raise MemoryFormatError(
                f"{path}: metadata 'version' is {meta.get('version')!r}, "
                f"this package reads 1 to {VERSION}"
            )
        fields = {}
        for name in _META:
            try:
                fields[name] = json.loads(meta.get(name, "{}"))
            except json.JSONDecodeError as e:
                raise MemoryFormatError(f"{path}: metadata '{name}' is not valid JSON ({e})") from e
        tensors: dict[str, dict[int, torch.Tensor]] = {}
        for name, arr in arrays.items():
            m = _TENSOR.match(name)
            if m is not None:
                tensors.setdefault(m.group(2), {})[int(m.group(1))] = arr
        keys = tensors.get("keys", {})
        if not keys:
            raise MemoryFormatError(f"{path}: no 'layers.<l>.keys' tensors in the file")
        scales = tensors.get("key_scales", {})
        for layer in list(keys):
            if layer in scales:
                keys[layer] = keys[layer].float() * scales[layer].float()[:, None]
                fields["compression"]["keys"] = "int8"
        probe_keys, probe_logits = tensors.get("probe_keys", {}), tensors.get("probe_logits", {})
        bandwidth = {int(k): float(v) for k, v in fields["bandwidth"].items() if int(k) in keys}
        return cls(
            keys,
            tensors.get("logits", {}),
            fields["fingerprint"],
            bandwidth,
            fields["build"],
            fields["retrieval"],
            path,
            tensors.get("projection", {}),
            {layer: (probe_keys[layer], probe_logits[layer]) for layer in probe_keys},
            fields["compression"],
        )

    def validate(self, model: nn.Module) -> list[str]:
        """Raise MemoryMismatchError naming every structural difference; return notes on
        differences that still work (top-k, router weights)."""
        ours, theirs = self.fingerprint, fingerprint(model)
        problems = [
            f"{name}: memory has {ours.get(name)!r}, model has {theirs[name]!r}"
            for name in ("model_type", "hidden_size", "num_experts")
            if ours.get(name) != theirs[name]
        ]
        extra = sorted(set(self.layers) - set(theirs["moe_layers"]))
        if extra:
            problems.append(f"layers {extra} are not MoE layers of the model")
        if problems:
            where = f"memory {self.path}" if self.path else "memory"
            raise MemoryMismatchError(
                f"{where} does not fit this model:\n  " + "\n  ".join(problems)
            )
        notes = []
        if ours.get("top_k") != theirs["top_k"]:
            notes.append(
                f"top_k: memory built with {ours.get('top_k')}, model uses {theirs['top_k']}"
            )
        hashes = ours.get("router_hash", {})
        differ = [i for i in self.layers if hashes.get(str(i)) != theirs["router_hash"][str(i)]]
        if differ:
            notes.append(f"router weights differ from the memory's in layers {differ}")
        return notes


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: ``x ~ q * scale[:, None]``."""
    x = x.float()
    scale = x.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
