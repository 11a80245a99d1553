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
import re
import secrets
from typing import Dict, Iterable, Optional, Tuple

import torch

from ..engine.engine import ReferenceEntry


class _Shared:
    def __repr__(self):
        return "<shared namespace>"


SHARED = _Shared()

# Entry ids are random, not a count: a store-wide counter would tell a tenant how many requests the others made
# between two of its own. 64 bits drawn from `secrets`; the store draws again on the (negligible) chance of a clash
# with a stored id, so an id never names two entries.
ENTRY_ID = re.compile(r"kv[0-9a-f]{16}")


def new_entry_id() -> str:
    return f"kv{secrets.token_hex(8)}"


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
    checksum: Optional[str] = None  # entry_checksum when stored (checksums=True), saved or loaded; else None

    @property
    def namespace(self):
        return SHARED if self.shared else self.tenant

    def snapshot(self) -> StoredEntry:
        return StoredEntry(self.id, self.entry, self.tenant, self.shared, self.parent, tuple(sorted(self.children)),
                           self.depth, None if self.edits is None else dict(self.edits), self.opcodes, self.tier)


CHECKSUM_FIELDS = ("token_ids", "keys", "values", "codes", "embedding")  # every tensor of a ReferenceEntry


def tensors_checksum(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over tensors: each one's dtype and shape, then its bytes as stored (C order).

    The checksum a save writes into the index (over the bytes it hands to the tensor file), the one a load and
    `KVStore.verify` compare with: one function, so the three cannot disagree on what is hashed.
    """
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy
    return h.hexdigest()


def entry_checksum(entry: ReferenceEntry) -> str:
    """SHA-256 over every tensor of an entry (`tensors_checksum` of CHECKSUM_FIELDS in that order)."""
    return tensors_checksum(getattr(entry, name) for name in CHECKSUM_FIELDS)
