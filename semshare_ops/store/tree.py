"""The DELTA tree: which stored entry each entry's K/V were served from, the edits between them, and the reuse hops.

Each stored entry records its parent (the base whose K/V it was served from; None after a full prefill), the edit script
from the parent's token ids to its own (`edit_script`: the engine's token alignment, `matching.edit_opcodes`, with
counts in tokens: `keep` and `insert` and `replace` count the entry's own tokens, `delete` the parent's), and its
`depth`: the number of reuse hops its K/V went through since a full prefill. Reused K/V drift a little at each hop
(tokens not recomputed keep K/V computed in another context), so a hop counts unless it was a pure extension: the base
is a prefix of the request and nothing past that prefix was matched, in which case the reused K/V are causal-prefix K/V,
the same a full prefill computes (a growing chat history stays at the depth of its first turn; `depth_after`). An entry
whose K/V are all a full prefill's (served from a base's exact rows only, under the gate, or with nothing left reused in
any layer: its `exact_prefix` is its whole length) has depth 0. The store's `max_depth` bounds the depth of every entry
it stores: a base is not used when serving from it would exceed it (with max_depth=0 the store serves only pure
extensions of stored prompts, as a prefix cache does, and keeps only exact K/V). Entries loaded from a save made under a
larger bound keep their depth; they are not used as bases past it.

Long chains are merged: when an entry is evicted or removed, its children are re-parented to its parent, with the
edit script recomputed directly between the two token sequences; depth is a property of the K/V (their drift), so
merging does not change it. `chain(id)` is the path root -> id in the tree as it stands.

The tree also widens retrieval (`expand`): the parent and the most recent children of every retrieved entry are
candidates too. An edit chain req1 -> req2 -> req3 makes req2 a candidate for req3 even when the embedding search
returns only req1 (near-identical prompts have near-identical keys, so a top-N may hold only some of them).

`DeltaTree` is also the store's registry of nodes by id: every stored entry is a node of the tree (a root when it
has no parent). Callers hold the store's index lock.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..engine import matching
from .entries import Node

_TAGS = {"equal": "e", "insert": "i", "delete": "d", "replace": "r"}  # one letter: opcodes are kept per entry


def edit_script(parent_ids: Sequence[int], child_ids: Sequence[int]) -> Tuple[Dict[str, int], Tuple[tuple, ...]]:
    """(counts, opcodes) of the edits turning `parent_ids` into `child_ids`: the engine's token alignment
    (`matching.edit_opcodes`).

    counts: keep / insert / replace in the child's tokens, delete in the parent's. opcodes: (tag, i1, i2, j1, j2)
    with tag one of "e" (equal), "i" (insert), "d" (delete), "r" (replace), as difflib's get_opcodes.
    """
    counts = {"keep": 0, "insert": 0, "delete": 0, "replace": 0}
    codes = []
    for tag, i1, i2, j1, j2 in matching.edit_opcodes(parent_ids, child_ids):
        name = {"equal": "keep"}.get(tag, tag)
        counts[name] += (i2 - i1) if tag == "delete" else (j2 - j1)
        codes.append((_TAGS[tag], i1, i2, j1, j2))
    return counts, tuple(codes)


def depth_after(base_depth: int, base_tokens: int, prefix: int, matched: int) -> int:
    """Depth of an entry served from a base at `base_depth` (`base_tokens` long, sharing a common prefix of `prefix`
    tokens with the request, `matched` tokens matched): one hop more, unless it is a pure extension of the base."""
    extension = prefix == base_tokens and matched == base_tokens
    return base_depth if extension else base_depth + 1


class DeltaTree:
    """Every stored node by id, linked parent <-> children."""

    def __init__(self):
        self._nodes: Dict[str, Node] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._nodes

    def nodes(self) -> List[Node]:
        return list(self._nodes.values())

    def node(self, entry_id: str) -> Node:
        node = self._nodes.get(entry_id)
        if node is None:
            raise KeyError(f"entry_id: no stored entry {entry_id!r}")
        return node

    def get(self, entry_id: str) -> Optional[Node]:
        return self._nodes.get(entry_id)

    def add(self, node: Node) -> None:
        """Register a node, and link it to its parent if that is already here (see `link_children`)."""
        self._nodes[node.id] = node
        if node.parent in self._nodes:
            self._nodes[node.parent].children.add(node.id)

    def link_children(self) -> None:
        """Link every node to its parent: after a bulk restore, where a child may come before its parent."""
        for node in self._nodes.values():
            if node.parent is not None:
                self._nodes[node.parent].children.add(node.id)

    def remove(self, node: Node) -> None:
        """Unregister a node and merge its chain: its children go to its parent, edit scripts recomputed."""
        del self._nodes[node.id]
        parent = self._nodes.get(node.parent) if node.parent is not None else None
        if parent is not None:
            parent.children.discard(node.id)
        for child_id in node.children:
            child = self._nodes[child_id]
            child.parent = None if parent is None else parent.id
            if parent is None:
                child.edits = child.opcodes = None
            else:
                parent.children.add(child_id)
                child.edits, child.opcodes = edit_script(parent.entry.token_ids.tolist(),
                                                         child.entry.token_ids.tolist())
        node.children = set()

    def chain(self, entry_id: str) -> List[str]:
        """Ids on the path root -> `entry_id`."""
        path, node = [], self.node(entry_id)
        while node is not None:
            path.append(node.id)
            node = self._nodes.get(node.parent) if node.parent is not None else None
        return path[::-1]

    def expand(self, retrieved: Iterable[str], n: int, namespaces: Sequence) -> List[Node]:
        """The retrieved nodes, each followed by its parent and its `n` most recently used children when those
        are in `namespaces`; first occurrence only."""
        chosen: Dict[str, None] = {}
        for entry_id in retrieved:
            node = self._nodes[entry_id]
            chosen[node.id] = None
            children = sorted(node.children, key=lambda c: -self._nodes[c].stamp)[:n]
            for other in [node.parent, *children]:
                if other is not None and self._nodes[other].namespace in namespaces:
                    chosen[other] = None
        return [self._nodes[i] for i in chosen]

    def surviving_base(self, chain: Sequence[str], token_ids: Sequence[int]
                       ) -> Tuple[Optional[str], Optional[Dict[str, int]], Optional[Tuple[tuple, ...]]]:
        """(parent, edits, opcodes) for an entry whose base left while it was served: its nearest ancestor still
        here on `chain` (the base's path root -> base at lookup time), with the edit script from it to
        `token_ids`; (None, None, None) when none is left."""
        alive = [i for i in chain[:-1] if i in self._nodes]
        if not alive:
            return None, None, None
        parent = alive[-1]
        edits, opcodes = edit_script(self._nodes[parent].entry.token_ids.tolist(), list(token_ids))
        return parent, edits, opcodes
