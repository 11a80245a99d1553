"""What the store keeps per entry: `Node`, the one mutable record every part of the store works on, and the
read-only `StoredEntry` it hands out.

One record rather than a table per part (retrieval, tree, tiers): an entry enters and leaves all of them at once,
under the store's one index lock, and a record shared by reference cannot fall out of step between them. Only code
holding that lock changes a `Node`; callers outside the store get `StoredEntry` snapshots.

A namespace is a tenant's name, or `SHARED` for entries stored with `shared=True`: an object no tenant name (a str)
can be equal to, so no tenant can name its way into the shared namespace.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, Optional, Tuple

import torch

from ..engine.engine import ReferenceEntry


class _Shared:
    def __repr__(self):
        return "<shared namespace>"


SHARED = _Shared()


@dataclasses.dataclass(frozen=True)
class StoredEntry:
    """A read-only snapshot of one stored entry and its place in the DELTA tree."""

    id: str
    entry: ReferenceEntry
    tenant: str
    shared: bool
    parent: Optional[str]
    children: Tuple[str, ...]
    depth: int
    edits: Optional[Dict[str, int]]  # None for a root
    opcodes: Optional[Tuple[tuple, ...]]
    tier: str  # "device" or "offload"

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    @property
    def prompt_tokens(self) -> int:
        return int(self.entry.token_ids.numel())


@dataclasses.dataclass
class Node:
    """One stored entry inside the store (guarded by the store's index lock)."""

    id: str
    entry: ReferenceEntry
    tenant: str
    shared: bool
    key: Optional[torch.Tensor]  # retrieval key: int64 [W] simhash code, or fp32 [dim] unit sentence embedding
    parent: Optional[str]
    depth: int
    edits: Optional[Dict[str, int]]
    opcodes: Optional[Tuple[tuple, ...]]
    tier: Optional[str]  # None once dropped by the budgets
    stamp: int  # recency clock at store or last use as a base
    children: set = dataclasses.field(default_factory=set)
    checksum: Optional[str] = None

    @property
    def namespace(self):
        return SHARED if self.shared else self.tenant

    def snapshot(self) -> StoredEntry:
        return StoredEntry(self.id, self.entry, self.tenant, self.shared, self.parent, tuple(sorted(self.children)),
                           self.depth, None if self.edits is None else dict(self.edits), self.opcodes, self.tier)


def entry_checksum(entry: ReferenceEntry) -> str:
    """SHA-1 over every tensor of an entry (bytes as stored)."""
    h = hashlib.sha1()
    for t in (entry.token_ids, entry.keys, entry.values, entry.codes, entry.embedding):
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
