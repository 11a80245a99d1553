"""The DELTA tree (semshare_ops/store/tree.py): edit scripts, chains found through the tree, depth, merging."""

import pytest

from semshare_ops.engine import matching
from semshare_ops.store.store import KVStore
from semshare_ops.store.tree import edit_script

from store_testutils import NEW, TOKEN_BYTES, assert_tree_consistent, base_tokens, fresh, replace

pytestmark = pytest.mark.usefixtures("one_thread")


def test_edit_script_counts_and_opcodes():
    """Counts in tokens (keep / insert / replace the child's, delete the parent's); opcodes are the engine's
    alignment with one-letter tags, so the kept runs are exactly the pairs the engine reuses."""
    parent, child = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 90, 91, 92, 4, 5, 6, 8, 9, 10, 11, 99]
    counts, opcodes = edit_script(parent, child)
    assert counts == {"keep": 9, "insert": 1, "delete": 1, "replace": 3}
    assert opcodes == (("e", 0, 2, 0, 2), ("r", 2, 3, 2, 5), ("e", 3, 6, 5, 8), ("d", 6, 7, 8, 8),
                       ("e", 7, 11, 8, 12), ("i", 11, 11, 12, 13))
    # Inside the prompts, a kept run is at least 3 tokens long (matching._MIN_TRUSTED_RUN): [4, 5] and [7, 8] here
    # are coincidences between edits, not kept.
    assert edit_script([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 9, 9, 9, 4, 5, 7, 8, 10]) == (
        {"keep": 2, "insert": 0, "delete": 0, "replace": 8}, (("e", 0, 2, 0, 2), ("r", 2, 8, 2, 10)))
    kept = [(j, i) for tag, i1, i2, j1, j2 in opcodes if tag == "e" for i, j in zip(range(i1, i2), range(j1, j2))]
    assert tuple(map(list, zip(*kept))) == matching.edit_pairs(parent, child)
    assert edit_script([3, 4], [3, 4]) == ({"keep": 2, "insert": 0, "delete": 0, "replace": 0}, (("e", 0, 2, 0, 2),))
    assert edit_script([], [3, 4]) == ({"keep": 0, "insert": 2, "delete": 0, "replace": 0}, (("i", 0, 0, 0, 2),))


def test_cheapest_chain_req1_req2_req3(edit_engine):
    """req1 -> req3 needs 15 new tokens, req1 -> req2 10, req2 -> req3 5: req3 is served from req2, found as a
    DELTA-tree neighbour even though the embedding search returns a single candidate. (The edits touch the first
    16 tokens, so no two requests share a prefix anchor: only the tree brings the second candidate in.)"""
    store = KVStore(edit_engine, candidates=1)
    req1 = base_tokens(200, seed=5)
    req2 = replace(req1, 2, 10)
    req3 = replace(req2, 12, 5)
    id1 = store.generate(req1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    out2 = store.generate(req2, tenant="t", max_new_tokens=NEW)
    id2 = out2.stats["request_id"]
    assert out2.stats["base_id"] == id1 and len(req2) - out2.stats["matched_tokens"] == 10
    look = store.lookup(req3, tenant="t")
    assert look.candidates == {id1: 15, id2: 5}  # one retrieved, the other its tree neighbour
    assert tuple(look) == (id2, 5)
    out3 = store.generate(req3, tenant="t", max_new_tokens=NEW)
    id3 = out3.stats["request_id"]
    assert out3.stats["hit"] and out3.stats["base_id"] == id2 and out3.stats["matched_tokens"] == len(req3) - 5
    assert store.chain(id3) == [id1, id2, id3]
    assert store.get(id3).edits == {"keep": 195, "insert": 0, "delete": 0, "replace": 5}
    assert store.get(id3).opcodes == (("e", 0, 12, 0, 12), ("r", 12, 17, 12, 17), ("e", 17, 200, 17, 200))
    assert store.get(id3).depth == 2
    # Removing the middle of the chain merges it: req3 hangs on req1 with the edit script req1 -> req3.
    store.remove(id2)
    assert store.chain(id3) == [id1, id3] and store.get(id1).children == (id3,)
    assert store.get(id3).edits == {"keep": 185, "insert": 0, "delete": 0, "replace": 15}
    assert store.get(id3).depth == 2  # the K/V went through two reuse hops whatever the tree says now
    assert_tree_consistent(store)
    with pytest.raises(KeyError, match="entry_id"):
        store.remove(id2)


def test_max_depth_makes_deep_bases_unusable(edit_engine):
    store = KVStore(edit_engine, max_depth=1)
    req1 = base_tokens(150, seed=6)
    req2 = replace(req1, 20, 8)
    req3 = replace(req2, 100, 3)
    id1 = store.generate(req1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id2 = store.generate(req2, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.get(id2).depth == 1
    # req2 is cheaper (3 vs 11) but at depth 1 serving from it would give depth 2 > max_depth.
    look = store.lookup(req3, tenant="t")
    assert look.candidates[id2] < look.candidates[id1] and look.base_id == id1 and look.depth == 1
    # A pure extension of req2 reuses causal-prefix K/V: no new hop, so req2 may serve it.
    ext = req2 + fresh(7)
    assert store.lookup(ext, tenant="t").base_id == id2 and store.lookup(ext, tenant="t").depth == 1
    # With req1 gone, the only base is too deep: full prefill, new root.
    store.remove(id1)
    out = store.generate(req3, tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] is False and out.stats["mode"] == "full" and out.stats["base_id"] is None
    assert store.get(out.stats["request_id"]).parent is None and store.get(out.stats["request_id"]).depth == 0
    # max_depth=0: no reuse at all.
    flat = KVStore(edit_engine, max_depth=0)
    flat.generate(req1, tenant="t", max_new_tokens=NEW)
    assert flat.generate(req2, tenant="t", max_new_tokens=NEW).stats["hit"] is False


def test_eviction_merges_chain(edit_engine):
    n = 64
    store = KVStore(edit_engine, capacity_bytes=3 * n * TOKEN_BYTES)
    r1 = base_tokens(n, 20)
    r2 = replace(r1, 10, 4)
    id1 = store.generate(r1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id2 = store.generate(r2, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id3 = store.generate(replace(r2, 40, 2), tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.chain(id3) == [id1, id2, id3]
    # LRU order now: id1 (used for id2, then id2 used for id3), so id1 goes: id2 becomes a root.
    store.generate(base_tokens(n, 21), tenant="t", max_new_tokens=NEW)
    assert id1 not in store and store.get(id2).parent is None and store.get(id2).edits is None
    assert store.chain(id3) == [id2, id3]
    assert_tree_consistent(store)
