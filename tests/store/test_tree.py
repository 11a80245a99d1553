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


def test_a_base_matched_whole_but_not_as_a_prefix_costs_a_hop(edit_engine):
    """A hop is free only for a pure extension (the base is a prefix of the request). A request that keeps every
    token of its base but has tokens inserted inside it matches the whole base, yet the K/V after the insertion move
    to other positions and sit behind other tokens: they drift, so the hop counts (depth 1), as for a replacement.
    Matching the whole base alone, without the prefix, must not pass for an extension."""
    store = KVStore(edit_engine)
    base = base_tokens(120, seed=31)
    id0 = store.generate(base, tenant="t", max_new_tokens=NEW).stats["request_id"]
    inserted = base[:70] + fresh(6) + base[70:]
    out = store.generate(inserted, tenant="t", max_new_tokens=NEW)
    assert out.stats["base_id"] == id0 and out.stats["matched_tokens"] == len(base)  # all of the base is taken
    assert out.stats["depth"] == 1 and store.get(out.stats["request_id"]).depth == 1
    # The pure extension of the same base: prefix and match both the whole base, no hop.
    look = store.lookup(base + fresh(9), tenant="t")
    assert look.base_id == id0 and look.depth == 0


def test_a_prefix_base_matched_past_the_prefix_costs_a_hop(engine):
    """The other half of a pure extension: nothing past the prefix is matched. With the LSH alignment a request
    that extends its base can have a token of its extension matched to a base row too (101 matched of a 100-token
    base here); those K/V come from another position and context, so it is not a pure extension: one hop (depth 1),
    and a store with max_depth=0, which serves only pure extensions as a prefix cache does, does not use the base."""
    base = base_tokens(100, seed=40)
    request = base + base_tokens(40, seed=540)
    store = KVStore(engine)
    id0 = store.generate(base, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert engine.match(store.get(id0).entry, request).matched > len(base)  # the case under test: matched past it
    look = store.lookup(request, tenant="t")
    assert look.base_id == id0 and look.depth == 1
    flat = KVStore(engine, max_depth=0)
    flat_id = flat.generate(base, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert flat.lookup(request, tenant="t").base_id is None
    assert tuple(flat.lookup(base + fresh(40), tenant="t")) == (flat_id, 40)  # a pure extension is still served


def test_merging_recomputes_an_asymmetric_edit_script_parent_to_child(edit_engine):
    """Removing the middle of req1 -> req2 -> req3 (req2 inserts 6 tokens into req1, req3 deletes 3 of req1's from
    req2) hangs req3 on req1 with the script req1 -> req3, not req3 -> req1: `insert` counts req3's new tokens,
    `delete` req1's dropped ones. (Replacements of equal length read the same both ways, so they cannot tell the
    direction apart.)"""
    store = KVStore(edit_engine)
    req1 = base_tokens(140, seed=32)
    req2 = req1[:40] + fresh(6) + req1[40:]
    req3 = req2[:90] + req2[93:]  # req2[90:93] are req1[84:87]
    id1 = store.generate(req1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id2 = store.generate(req2, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id3 = store.generate(req3, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.chain(id3) == [id1, id2, id3]
    assert store.get(id3).edits == {"keep": 143, "insert": 0, "delete": 3, "replace": 0}
    store.remove(id2)
    assert store.chain(id3) == [id1, id3]
    assert store.get(id3).edits == {"keep": 137, "insert": 6, "delete": 3, "replace": 0}
    assert store.get(id3).opcodes == (("e", 0, 40, 0, 40), ("i", 40, 40, 40, 46), ("e", 40, 84, 46, 90),
                                      ("d", 84, 87, 90, 90), ("e", 87, 140, 90, 143))
    assert_tree_consistent(store)


def test_expand_adds_the_n_most_recent_children(edit_engine, equal_keys):
    """The retrieved entry's `candidates` most recently stored children are candidates too (here 2 of 4), and no
    more. With every key equal the top-2 are the two oldest entries (root, child1); each child replaces 3 tokens of
    the root within the first 16 (no shared prefix anchor), so child3 reaches the candidates only as one of the root's
    two most recent children: the request, child3 with 2 more tokens replaced, is served from it."""
    store = KVStore(edit_engine, candidates=2)
    root = base_tokens(120, seed=33)
    id0 = store.generate(root, tenant="t", max_new_tokens=NEW).stats["request_id"]
    children = [replace(root, at, 3) for at in (1, 4, 7, 10)]
    ids = [store.generate(c, tenant="t", max_new_tokens=NEW).stats["request_id"] for c in children]
    assert all(store.get(i).parent == id0 for i in ids)
    request = replace(children[2], 13, 2)
    look = store.lookup(request, tenant="t")
    assert look.candidates == {id0: 5, ids[0]: 8, ids[3]: 8, ids[2]: 2}  # child2, the third most recent, is not one
    assert tuple(look) == (ids[2], 2)


def test_a_load_links_children_restored_before_their_parent(edit_engine, tmp_path):
    """A save lists entries in LRU order, so a parent used as a base after its child was stored comes after that
    child in the file. The loaded tree still links the child to the parent (`link_children` after the bulk add):
    the same children and chains as before the save."""
    store = KVStore(edit_engine)
    root = base_tokens(100, seed=34)
    id0 = store.generate(root, tenant="t", max_new_tokens=NEW).stats["request_id"]
    id1 = store.generate(replace(root, 20, 4), tenant="t", max_new_tokens=NEW).stats["request_id"]
    id2 = store.generate(replace(root, 60, 3), tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.get(id2).parent == id0  # root used again: now more recent than id1
    order = [e.id for e in store.entries()]
    assert order.index(id1) < order.index(id0)
    store.save(tmp_path)
    loaded = KVStore.load(tmp_path, edit_engine)
    assert loaded.get(id0).children == tuple(sorted((id1, id2))) == store.get(id0).children
    assert loaded.chain(id1) == [id0, id1]
    assert_tree_consistent(loaded)


def test_an_entry_whose_base_left_hangs_on_its_nearest_surviving_ancestor(edit_engine, monkeypatch):
    """req4 is served from req3 (chain req1 -> req2 -> req3), and req3 is removed while the engine serves it. req4
    is stored under req2, the nearest ancestor still there, not the root req1, with the script req2 -> req4 (req4
    inserts 6 tokens that req2 lacks: an asymmetric script, so the direction shows)."""
    store = KVStore(edit_engine)
    req1 = base_tokens(150, seed=35)
    req2 = replace(req1, 30, 5)
    req3 = replace(req2, 90, 4)
    req4 = req3[:120] + fresh(6) + req3[120:]
    ids = [store.generate(r, tenant="t", max_new_tokens=NEW).stats["request_id"] for r in (req1, req2, req3)]
    assert store.chain(ids[2]) == ids
    generate = edit_engine.generate

    def base_leaves_meanwhile(*args, **kwargs):
        store.remove(ids[2])
        return generate(*args, **kwargs)

    monkeypatch.setattr(edit_engine, "generate", base_leaves_meanwhile)
    out = store.generate(req4, tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["base_id"] == ids[2] and ids[2] not in store
    id4 = out.stats["request_id"]
    assert store.chain(id4) == [ids[0], ids[1], id4]
    assert store.get(id4).edits == {"keep": 146, "insert": 6, "delete": 0, "replace": 4}
    assert store.get(id4).depth == 3  # the K/V went through req3: three hops, whatever the tree says now
    assert_tree_consistent(store)
