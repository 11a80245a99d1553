"""Capacity (semshare_ops/store/tiers.py): LRU order, the byte budget, the CPU offload tier."""

import pytest

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
