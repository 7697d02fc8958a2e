"""Memories that grow: join memories built separately for the same model."""

from __future__ import annotations

import mlx.core as mx

from .file_format import MemoryMismatchError, fingerprint_differences
from .store import Memory


def check_same_model(memories: list[Memory], names: list[str]) -> None:
    """Refuse memories whose fingerprints differ, naming the fields that do."""
    for memory, name in zip(memories[1:], names[1:]):
        differ = fingerprint_differences(
            memories[0].fingerprint, memory.fingerprint, names[0], name
        )
        if differ:
            raise MemoryMismatchError(f"memories built for different models ({'; '.join(differ)})")


def merge_memories(memories: list[Memory], names: list[str] | None = None) -> Memory:
    """One memory with every entry, in argument order; provenance accumulates in ``build``."""
    if not memories:
        raise ValueError("merge_memories needs at least one memory")
    names = names or [str(m.path or f"memory {i}") for i, m in enumerate(memories)]
    if len(names) != len(memories):
        raise ValueError(f"{len(memories)} memories but {len(names)} names")
    check_same_model(memories, names)
    for memory, name in zip(memories, names):
        if memory.compression or memory.projection:
            raise ValueError(
                f"{name} is compressed; merge the uncompressed memories, then compress "
                "(build_memory --budget off keeps a memory uncompressed)"
            )
        if memory.layers != memories[0].layers:
            raise MemoryMismatchError(
                f"{name} has layers {memory.layers}, {names[0]} has {memories[0].layers}"
            )
    layers = memories[0].layers
    keys = {i: mx.concatenate([m.keys[i] for m in memories]) for i in layers}
    logits = {i: mx.concatenate([m.logits[i] for m in memories]) for i in layers}
    parts = [m.build.get("parts") or [_part(m, n)] for m, n in zip(memories, names)]
    parts = [p for ps in parts for p in ps]
    etas = {p.get("eta") for p in parts}
    build = {
        "parts": parts,
        "datasets": [d for p in parts for d in p.get("datasets", [])],
        "examples": sum(p.get("examples", 0) for p in parts),
        "tokens": sum(p.get("tokens", 0) for p in parts),
        "entries": int(keys[layers[0]].shape[0]),
        "eta": etas.pop() if len(etas) == 1 else None,
    }
    first = memories[0]
    return Memory(
        keys, logits, first.fingerprint, build=build, retrieval=first.retrieval, probe=first.probe
    )


def _part(memory: Memory, name: str) -> dict:
    part = {k: v for k, v in memory.build.items() if k != "parts"}
    part.setdefault("source", name)
    return part
