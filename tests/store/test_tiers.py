"""Capacity (semshare_ops/store/tiers.py): LRU order, the byte budget, the CPU offload tier."""

import pytest

from semshare_ops.store import tiers
from semshare_ops.store.store import KVStore

from store_testutils import NEW, TOKEN_BYTES, assert_tree_consistent, base_tokens, replace

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lru_eviction_order_and_byte_budget(edit_engine):
    n = 64
    size = n * TOKEN_BYTES
    store = KVStore(edit_engine, capacity_bytes=3 * size)
    ids = {}
    for name, seed in (("A", 10), ("B", 11), ("C", 12)):
        ids[name] = store.generate(base_tokens(n, seed), tenant="t", max_new_tokens=NEW).stats["request_id"]
        assert store.device_nbytes <= 3 * size
    assert store.get(ids["A"]).nbytes == size and store.nbytes == 3 * size
    # Serving from A makes it recent: storing A' then evicts B, the least recently stored or used.
    out = store.generate(replace(base_tokens(n, 10), 5, 3), tenant="t", max_new_tokens=NEW)
    assert out.stats["base_id"] == ids["A"]
    assert [e.id for e in store.entries()] == [ids["C"], ids["A"], out.stats["request_id"]]
    assert store.evictions == 1 and len(store) == 3 and store.device_nbytes <= 3 * size
    D = store.generate(base_tokens(n, 13), tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert [e.id for e in store.entries()] == [ids["A"], out.stats["request_id"], D]  # C went next
    assert store.device_nbytes == 3 * size and store.evictions == 2
    assert_tree_consistent(store)
    assert store.get(out.stats["request_id"]).parent == ids["A"]
    # An entry larger than the whole budget is served but not stored.
    big = store.generate(base_tokens(4 * n, 14), tenant="t", max_new_tokens=NEW)
    assert big.stats["request_id"] is None and len(big.token_ids) == NEW and len(store) == 3
    assert store.evictions == 2


def test_offload_tier(edit_engine):
    n = 64
    size = n * TOKEN_BYTES
    store = KVStore(edit_engine, capacity_bytes=2 * size, offload_bytes=size, checksums=True)
    prompts = [base_tokens(n, 30 + i) for i in range(4)]
    a, b, c = (store.generate(p, tenant="t", max_new_tokens=NEW).stats["request_id"] for p in prompts[:3])
    assert store.get(a).tier == "offload" and store.get(a).entry.keys.device.type == "cpu"
    assert store.offloads == 1 and store.evictions == 0 and len(store) == 3
    assert store.device_nbytes == 2 * size and store.offloaded_nbytes == size
    d = store.generate(prompts[3], tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert a not in store and store.get(b).tier == "offload" and store.evictions == 1 and store.offloads == 2
    assert {store.get(i).tier for i in (c, d)} == {"device"}
    # An offloaded entry still serves requests (the engine moves it to its device), and stays unchanged.
    out = store.generate(replace(prompts[1], 20, 3), tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["base_id"] == b
    assert store.verify() == []
    assert store.device_nbytes <= 2 * size and store.offloaded_nbytes <= size


def test_a_failed_copy_to_the_cpu_tier_leaves_the_store_whole(edit_engine, tmp_path, monkeypatch):
    """The CPU copy of an entry leaving the device tier fails (host memory, simulated): the request that pushed it
    out raises and stores nothing, the entry stays where it was, counted, and the store saves and loads whole."""
    n = 64
    size = n * TOKEN_BYTES
    store = KVStore(edit_engine, capacity_bytes=2 * size, offload_bytes=4 * size)
    root = base_tokens(n, 50)
    a = store.generate(root, tenant="t", max_new_tokens=NEW).stats["request_id"]
    b = store.generate(replace(root, 30, 3), tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.get(b).parent == a
    before = (len(store), store.nbytes, store.device_nbytes, store.offloads, store.evictions)

    copies = []

    def no_host_memory(entry):
        copies.append(entry)
        raise MemoryError("simulated: no host memory for the CPU tier")

    with monkeypatch.context() as patch:
        patch.setattr(tiers, "host_copy", no_host_memory)
        with pytest.raises(MemoryError, match="simulated"):
            store.generate(base_tokens(n, 51), tenant="u", max_new_tokens=NEW)  # pushes `a` out of the device tier
    assert len(copies) == 1 and copies[0] is store.get(a).entry  # the failure was the copy of `a`

    assert (len(store), store.nbytes, store.device_nbytes, store.offloads, store.evictions) == before
    assert [e.id for e in store.entries()] == [a, b] and {e.tier for e in store.entries()} == {"device"}
    assert_tree_consistent(store)
    # The next request that needs the room moves `a` as it should.
    c = store.generate(base_tokens(n, 52), tenant="u", max_new_tokens=NEW).stats["request_id"]
    assert store.get(a).tier == "offload" and store.offloads == 1 and c in store
    store.save(tmp_path)
    assert [e.id for e in KVStore.load(tmp_path, edit_engine).entries()] == [e.id for e in store.entries()]


def test_a_copy_that_fails_after_another_moved_keeps_that_move_counted(edit_engine, monkeypatch):
    """A request pushes two entries out of the device tier: the first one's copy to the CPU tier succeeds, the
    second's fails (host memory, simulated). The request raises and stores nothing, no entry is lost: the first stays
    offloaded and counted as such (its move was whole), the second stays on the device."""
    n = 64
    size = n * TOKEN_BYTES
    store = KVStore(edit_engine, capacity_bytes=2 * size, offload_bytes=4 * size)
    a, b = (store.generate(base_tokens(n, seed), tenant="t", max_new_tokens=NEW).stats["request_id"]
            for seed in (53, 54))
    copy, copies = tiers.host_copy, []

    def second_copy_fails(entry):
        copies.append(entry)
        if len(copies) == 2:
            raise MemoryError("simulated: no host memory for the CPU tier")
        return copy(entry)

    with monkeypatch.context() as patch:
        patch.setattr(tiers, "host_copy", second_copy_fails)
        with pytest.raises(MemoryError, match="simulated"):
            store.generate(base_tokens(2 * n, 55), tenant="u", max_new_tokens=NEW)  # needs both a's and b's room
    assert len(copies) == 2
    assert [(e.id, e.tier) for e in store.entries()] == [(b, "device"), (a, "offload")]
    assert store.offloads == 1 and store.evictions == 0
    assert store.device_nbytes == store.offloaded_nbytes == size
    assert_tree_consistent(store)
