"""Capacity: the device tier and the CPU offload tier, each a least-recently-used list bounded in K/V bytes.

`capacity_bytes` bounds the K/V bytes (`ReferenceEntry.nbytes`) of the device tier; least recently used (stored
or served from) goes first. With `offload_bytes > 0` an entry evicted from the device tier moves to a CPU tier (a new
ReferenceEntry holding CPU copies; the engine moves a reference to its device when it serves from it), itself LRU-
bounded by `offload_bytes`; what leaves the CPU tier is dropped. An offloaded entry stays in the CPU tier when it
serves a request (its recency there is refreshed); it is not promoted back. An entry bigger than `capacity_bytes`
is not stored (its request is still served).

The budgets count bytes, not entries: entries range from a few tokens to whole conversations, and what runs out is
memory. This module only moves nodes between the tiers and says which ones left; the store takes dropped nodes out
of the tree and the retrieval index (and counts them), since re-parenting is the tree's job. Callers hold the
store's index lock.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, List, Optional

from ..engine.engine import ReferenceEntry
from .entries import Node

TIERS = ("device", "offload")


def host_copy(entry: ReferenceEntry) -> ReferenceEntry:
    """The entry with its K/V in CPU memory (what the CPU tier holds)."""
    return dataclasses.replace(entry, keys=entry.keys.cpu(), values=entry.values.cpu())


class Tiers:
    """The two LRU tiers; `enforce` applies the budgets."""

    def __init__(self, capacity_bytes: int, offload_bytes: int):
        self.capacity_bytes, self.offload_bytes = capacity_bytes, offload_bytes
        self._lru: Dict[str, "OrderedDict[str, Node]"] = {t: OrderedDict() for t in TIERS}
        self._bytes = {t: 0 for t in TIERS}

    def fits(self, entry: ReferenceEntry) -> bool:
        """Whether `entry` fits the device tier at all (a bigger one is served but not stored)."""
        return entry.nbytes <= self.capacity_bytes

    def nbytes(self, tier: Optional[str] = None) -> int:
        """K/V bytes held in `tier`, or in both."""
        return sum(self._bytes.values()) if tier is None else self._bytes[tier]

    def nodes(self) -> List[Node]:
        """Every node, least recently used first: device tier, then CPU tier."""
        return [node for tier in TIERS for node in self._lru[tier].values()]

    def add(self, node: Node) -> None:
        """Put a node into its tier (`node.tier`) as the most recent."""
        self._lru[node.tier][node.id] = node
        self._bytes[node.tier] += node.entry.nbytes

    def touch(self, node: Node) -> None:
        """Make a node the most recent of its tier."""
        self._lru[node.tier].move_to_end(node.id)

    def remove(self, node: Node) -> None:
        if node.tier is not None:
            del self._lru[node.tier][node.id]
            self._bytes[node.tier] -= node.entry.nbytes

    def enforce(self, offloaded: List[Node], dropped: List[Node]) -> None:
        """Apply the budgets, least recently used first, appending each node that moves to the CPU tier to
        `offloaded` and each that leaves the tiers (`tier` None) to `dropped`, in the order they go.

        Each move is whole before the next starts: the CPU copy is made before the node leaves the device tier, so
        a copy that fails (host memory) raises with that node still in its tier and every earlier move already in
        the lists, which the caller applies either way.
        """
        device = self._lru["device"]
        while self._bytes["device"] > self.capacity_bytes:
            node = next(iter(device.values()))
            if node.entry.nbytes <= self.offload_bytes:
                moved = host_copy(node.entry)
                self.remove(node)
                node.entry, node.tier = moved, "offload"
                self.add(node)
                offloaded.append(node)
            else:
                self.remove(node)
                node.tier = None
                dropped.append(node)
        offload = self._lru["offload"]
        while self._bytes["offload"] > self.offload_bytes:
            node = next(iter(offload.values()))
            self.remove(node)
            node.tier = None
            dropped.append(node)
