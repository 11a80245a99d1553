"""KVStore serving (semshare_ops/store/store.py): hits, choosing the base, tenants, immutability, threads, arguments.

Runs on a tiny random Llama with a fake tokenizer (conftest.py); prompts from store_testutils.py.
"""

import dataclasses
import threading
import time

import pytest
import torch

from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.store.store import KVStore

from engine_testutils import FakeTokenizer, build_model
from store_testutils import NEW, STORE_KEYS, assert_tree_consistent, base_tokens, fresh, replace

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_a_shared_entry_never_carries_a_private_prompt(edit_engine):
    """A shared request is served from shared entries only, not from its tenant's private ones: the K/V it stores
    for everyone would carry the private prompt (the kept rows were computed after its text). Two stores that
    differ only in alice's private secret end with the same shared entry."""
    public = base_tokens(120, seed=5)
    shared_keys = []
    for secret in (900, 901):
        store = KVStore(edit_engine)
        private = public[:40] + base_tokens(8, seed=secret) + public[48:]
        a = store.generate(private, tenant="alice", max_new_tokens=NEW).stats["request_id"]
        assert store.lookup(public, tenant="alice").base_id == a  # what a private request would be served from
        assert store.lookup(public, tenant="alice", shared=True).base_id is None
        out = store.generate(public, tenant="alice", shared=True, max_new_tokens=NEW)
        assert out.stats["hit"] is False
        entry = store.get(out.stats["request_id"])
        assert entry.shared and entry.parent is None
        bob = store.generate(replace(public, 90, 3), tenant="bob", shared=True, max_new_tokens=NEW)
        assert bob.stats["hit"] and bob.stats["base_id"] == entry.id
        shared_keys.append(entry.entry.keys)
        assert_tree_consistent(store)
    assert torch.equal(*shared_keys)


def test_stores_on_engines_of_one_model_take_turns(model, engine, edit_engine, monkeypatch):
    """Two engines on one model share its modules (the engine's first-layer capture hook sits on them): every
    store on either serialises its model calls under one lock. Two threads, one per store, start together; each
    engine call lingers inside, and no two calls may ever be inside at once."""
    assert engine.model is edit_engine.model
    assert KVStore(engine)._engine_lock is KVStore(edit_engine)._engine_lock
    other = ReuseEngine(build_model("llama", seed=1), FakeTokenizer(), ReuseConfig())
    assert KVStore(other)._engine_lock is not KVStore(engine)._engine_lock

    inside, most, guard = [0], [0], threading.Lock()
    for e in (engine, edit_engine):
        def watched(*args, _generate=e.generate, **kwargs):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)  # a call without the lock would overlap the other thread's here
            try:
                return _generate(*args, **kwargs)
            finally:
                with guard:
                    inside[0] -= 1
        monkeypatch.setattr(e, "generate", watched)
    stores = [KVStore(engine), KVStore(edit_engine)]
    start, errors = threading.Barrier(2), []

    def serve(store, seed):
        try:
            start.wait(10)
            for i in range(3):
                store.generate(base_tokens(40, seed=seed + i), tenant="t", max_new_tokens=NEW)
        except Exception as err:  # noqa: BLE001 - the test reads it
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(store, 50 + 10 * n)) for n, store in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and most[0] == 1, (errors, most)


def test_a_config_changed_under_the_model_lock_does_not_judge_a_store_request(edit_engine, monkeypatch):
    """Another thread holds `model_lock` around `engine.using(min_similarity=0.0)` while a store request is between
    retrieval and alignment: the request waits for it and is judged by the engine's own gate (0.5). It read the
    temporary 0.0 outside every lock and reused a base matching a third of it."""
    store = KVStore(edit_engine)
    base = base_tokens(60, seed=71)
    store.generate(base, tenant="t", max_new_tokens=NEW)
    target = fresh(30) + base[20:40] + fresh(10)  # 20 of its 60 tokens in the base, no common prefix
    retrieved, inside = threading.Event(), threading.Event()
    retrieve = store._index.retrieve
    monkeypatch.setattr(store._index, "retrieve",
                        lambda *a, **k: (retrieve(*a, **k), retrieved.set(), inside.wait(10))[0])

    def other_caller():
        retrieved.wait(10)
        with store.model_lock, edit_engine.using(dataclasses.replace(edit_engine.config, min_similarity=0.0)):
            inside.set()
            time.sleep(0.4)
        finished.set()

    finished = threading.Event()
    other = threading.Thread(target=other_caller)
    other.start()
    out = store.generate(target, tenant="t", max_new_tokens=NEW)
    other.join(10)
    assert finished.is_set() and edit_engine.config.min_similarity == 0.5
    assert out.stats["hit"] is False and out.stats["mode"] == "full"


def test_alignment_looks_up_embeddings_under_the_model_lock(engine, monkeypatch):
    """LSH matching embeds the tokens edit alignment leaves unmatched: a model call, under the lock that
    serialises model calls (it ran outside it, beside another store's `engine.generate`)."""
    store = KVStore(engine)
    base = base_tokens(80, seed=73)
    store.generate(base, tenant="t", max_new_tokens=NEW)
    held, embed = [], engine.embed
    monkeypatch.setattr(engine, "embed", lambda ids: held.append(store.model_lock._is_owned()) or embed(ids))
    store.lookup(replace(base, 30, 5), tenant="t")
    assert len(held) >= 2 and all(held), held  # the request's key and the unmatched tokens' codes


def _changed_in_place(engine: ReuseEngine) -> None:
    with torch.no_grad():
        engine.model.lm_head.weight.add_(0.01)


def test_entries_made_before_the_weights_changed_are_dropped_not_failed():
    """After an in-place weight change every stored entry is refused by the engine as a reference: a request that
    retrieved one failed (even an unrelated prompt, since retrieval returns the nearest keys). The store drops
    them at the first request that sees the new fingerprint and serves a full prefill."""
    engine = ReuseEngine(build_model("llama", seed=3), FakeTokenizer(), ReuseConfig())
    store = KVStore(engine)
    first = base_tokens(120, seed=75)
    a = store.generate(first, tenant="t", max_new_tokens=NEW).stats["request_id"]
    b = store.generate(replace(first, 50, 4), tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.get(b).parent == a
    _changed_in_place(engine)
    out = store.generate(replace(first, 80, 4), tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] is False and out.stats["mode"] == "full"
    assert [e.id for e in store.entries()] == [out.stats["request_id"]]
    assert out.token_ids == engine.generate(replace(first, 80, 4), max_new_tokens=NEW).token_ids
    assert store.generate(first, tenant="t", max_new_tokens=NEW).stats["hit"] is True  # served from the new one


def test_an_entry_made_while_the_weights_changed_is_not_stored(monkeypatch):
    """A request whose entry was made under other weights than those its store last saw (they changed while it was
    served) is served but not stored: the store would hold an entry the engine refuses."""
    engine = ReuseEngine(build_model("llama", seed=3), FakeTokenizer(), ReuseConfig())
    store = KVStore(engine)
    generate = engine.generate

    def changed_then_generate(*args, **kwargs):
        _changed_in_place(engine)
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", changed_then_generate)
    out = store.generate(base_tokens(60, seed=77), tenant="t", max_new_tokens=NEW)
    assert out.stats["request_id"] is None and len(store) == 0 and out.token_ids


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
    assert out.stats["matched_tokens"] == 39 and out.stats["depth"] == 0  # under the gate: its exact rows only
    # A prefix of fewer than min_reuse_tokens (16) tokens is not worth the reuse path.
    short = base_tokens(10, seed=72)
    store.generate(short, tenant="v", max_new_tokens=NEW)
    assert store.generate(short + fresh(30), tenant="v", max_new_tokens=NEW).stats["hit"] is False
    # The same 40 tokens, not at the start: below the gate, no reuse.
    other = fresh(100) + base_tokens(40, seed=71)
    store.generate(base_tokens(40, seed=71), tenant="u", max_new_tokens=NEW)
    assert store.lookup(other, tenant="u").base_id is None
    assert store.generate(other, tenant="u", max_new_tokens=NEW).stats["hit"] is False


def test_under_the_gate_only_the_exact_prefix_is_taken(engine):
    """A base under the gate is served only for its exact common prefix with the request, as a prefix cache would
    serve it, and every other position is computed in full: the request gets a full prefill's K/V (the gate's
    promise), not approximate reuse of what else matched. Before, the gate was lifted for the whole request: tokens
    of the base found again further on (here a 40-token span, then fuzzy matches) were reused at shifted positions.
    Only the base's exact rows count as its prefix: a base that was itself served by reuse lends no approximate
    row."""
    store = KVStore(engine, capacity_bytes=1 << 30)
    a = base_tokens(200, seed=90)
    store.generate(a, tenant="t", max_new_tokens=NEW)
    request = a[:20] + a[100:140] + fresh(100)  # 60 of 160 tokens found in the base: under the 0.5 gate
    assert store.lookup(request, tenant="t").cost == len(request) - 20
    out = store.generate(request, tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["mode"] == "reuse" and out.stats["depth"] == 0  # exact throughout
    assert out.stats["matched_tokens"] == 20 and out.stats["exact_tokens"] == 20
    assert out.stats["recomputed_tokens"] == [len(request) - 20] * engine.num_layers
    full = engine.prefill(request)
    torch.testing.assert_close(out.entry.keys, full.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.entry.values, full.values, atol=1e-4, rtol=1e-4)
    # A base served by reuse holds exact K/V only up to its exact prefix (past its edit at 30, up to the first row
    # some layer left reused): no more is lent under the gate.
    b = replace(a, 30, 4)
    served = store.generate(b, tenant="t", max_new_tokens=NEW)
    n = store.get(served.stats["request_id"]).entry.exact_prefix
    assert served.stats["hit"] and 30 < n < 100
    request = b[:100] + fresh(200)
    out = store.generate(request, tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["matched_tokens"] == n and out.stats["exact_tokens"] == n
    assert out.stats["depth"] == 0 and served.stats["depth"] == 1  # the base drifted one hop; what it lent did not
    torch.testing.assert_close(out.entry.keys, engine.prefill(request).keys, atol=1e-4, rtol=1e-4)
    # Above the gate, an entry left with no reused row (ratio 1.0) is exact too: depth 0, where a hop counted before.
    exact_store = KVStore(ReuseEngine(engine.model, FakeTokenizer(), ReuseConfig(recompute_ratio=1.0)))
    exact_store.generate(a, tenant="t", max_new_tokens=NEW)
    out = exact_store.generate(replace(a, 30, 4), tenant="t", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["depth"] == 0
    assert exact_store.get(out.stats["request_id"]).entry.exact_prefix == len(a)
    # The engine's own keyword, refused from a store's caller like the other serving choices.
    with pytest.raises(TypeError, match="prefix_only: chosen by the store"):
        store.generate(request, tenant="t", max_new_tokens=NEW, prefix_only=True)


def test_store_gate_is_the_engines_at_equality(edit_engine):
    """A base matching exactly min_similarity of the request (55 of 100 at 0.55, where 0.55 * 100 rounds up to
    55.000000000000007) is served by the store as the engine serves it with that reference: by reuse."""
    engine = ReuseEngine(edit_engine.model, FakeTokenizer(), ReuseConfig(matching="edit", min_similarity=0.55))
    reference = base_tokens(100, seed=73)
    target = fresh(15) + reference[15:70] + fresh(30)  # 100 tokens, 55 of them matched, no common prefix
    direct = engine.generate(target, reference=engine.prefill(reference), max_new_tokens=NEW).stats
    assert direct["mode"] == "reuse" and direct["similarity"] == 0.55
    store = KVStore(engine)
    base = store.generate(reference, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.lookup(target, tenant="t").base_id == base
    out = store.generate(target, tenant="t", max_new_tokens=NEW).stats
    assert out["hit"] and out["base_id"] == base and out["mode"] == "reuse"


def test_under_the_gate_an_exact_prefix_of_min_reuse_tokens_is_enough(edit_engine):
    """min_reuse_tokens (16) is the least a base under the gate must share as an exact prefix: 16 tokens are served
    from it, 15 are not worth the reuse path."""
    store = KVStore(edit_engine)
    base = base_tokens(60, seed=74)
    base_id = store.generate(base, tenant="t", max_new_tokens=NEW).stats["request_id"]
    request = base[:16] + fresh(60)  # 16 of 76 tokens: under the 0.5 gate
    assert tuple(store.lookup(request, tenant="t")) == (base_id, 60)
    out = store.generate(request, tenant="t", max_new_tokens=NEW).stats
    assert out["hit"] and out["base_id"] == base_id and out["matched_tokens"] == 16
    assert store.lookup(base[:15] + fresh(60), tenant="t").base_id is None


def test_under_the_gate_a_reused_base_is_costed_by_its_exact_rows(engine):
    """A base that was itself served by reuse lends, under the gate, only its exact prefix (n rows, past its edit at
    30), not the 100 tokens it shares with the request: the lookup's cost, and the candidate's cost it reports,
    count what those n rows leave to compute, as the engine will serve it."""
    store = KVStore(engine)
    a = base_tokens(200, seed=90)
    store.generate(a, tenant="t", max_new_tokens=NEW)
    b = replace(a, 30, 4)
    served = store.generate(b, tenant="t", max_new_tokens=NEW).stats
    n = store.get(served["request_id"]).entry.exact_prefix
    assert served["hit"] and 30 < n < 100
    request = b[:100] + fresh(200)
    look = store.lookup(request, tenant="t")
    assert look.base_id == served["request_id"]
    assert look.cost == look.candidates[look.base_id] == len(request) - n


def test_a_request_is_served_by_the_gate_it_was_judged_by(model, monkeypatch):
    """The gate the store read when it chose the base goes with the engine call: a config changed (under the model
    lock) between the choice and the serving, here to a gate of 0.99, does not turn the reuse the store judged by
    0.5 into a full prefill of a request it recorded as a hit."""
    engine = ReuseEngine(model, FakeTokenizer(), ReuseConfig(matching="edit"))  # its own: its config changes
    store = KVStore(engine)
    base = base_tokens(100, seed=76)
    base_id = store.generate(base, tenant="t", max_new_tokens=NEW).stats["request_id"]
    choose = store._choose

    def choose_then_raise_the_gate(*args):
        choice = choose(*args)
        with store.model_lock:
            engine.config = dataclasses.replace(engine.config, min_similarity=0.99)
        return choice

    monkeypatch.setattr(store, "_choose", choose_then_raise_the_gate)
    out = store.generate(replace(base, 40, 8), tenant="t", max_new_tokens=NEW).stats  # 92 of 100 tokens matched
    assert engine.config.min_similarity == 0.99
    assert out["hit"] and out["mode"] == "reuse" and out["base_id"] == base_id


def test_of_equal_cost_and_depth_the_most_recently_used_base_is_chosen(edit_engine):
    """Two bases as cheap and as deep as each other: the more recently stored or served from wins, as the LRU tiers
    would keep it longest. a and b each replace 4 tokens of x (both depth 1, roots once x is removed)."""
    store = KVStore(edit_engine)
    x = base_tokens(120, seed=77)
    x_id = store.generate(x, tenant="t", max_new_tokens=NEW).stats["request_id"]
    a_tokens = replace(x, 30, 4)
    a, b = (store.generate(p, tenant="t", max_new_tokens=NEW).stats["request_id"]
            for p in (a_tokens, replace(x, 60, 4)))
    store.remove(x_id)
    assert store.get(a).depth == store.get(b).depth == 1
    look = store.lookup(x, tenant="t")
    assert look.candidates == {a: 4, b: 4} and look.base_id == b  # b was stored after a
    served = store.generate(replace(a_tokens, 90, 2), tenant="t", max_new_tokens=NEW).stats
    assert served["base_id"] == a  # a is now the more recently used
    assert store.lookup(x, tenant="t").base_id == a


def test_ttft_counts_the_stores_lookup(engine, monkeypatch):
    """ttft_ms is what the caller waits for its first token: the store's retrieval and alignment (retrieval slowed by
    50 ms here) before the engine's own time to first token, not the engine's alone."""
    store = KVStore(engine)
    retrieve = store._index.retrieve
    monkeypatch.setattr(store._index, "retrieve", lambda *a, **k: (time.sleep(0.05), retrieve(*a, **k))[1])
    stats = store.generate(base_tokens(40, seed=78), tenant="t", max_new_tokens=NEW).stats
    assert stats["lookup_ms"] >= 50
    assert stats["ttft_ms"] >= stats["engine_ttft_ms"] + stats["lookup_ms"]


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


def test_verify_skips_entries_stored_without_a_checksum(engine):
    """A store made with checksums=False records no checksum when it stores an entry: verify() has nothing to compare
    such an entry with, and reports none of them (not every one as damaged), even one changed in memory."""
    store = KVStore(engine)
    ids = [store.generate(base_tokens(60, seed), tenant="t", max_new_tokens=NEW).stats["request_id"]
           for seed in (41, 42)]
    assert store.verify() == []
    with torch.inference_mode():
        store.get(ids[0]).entry.values[0, 0, 0, 0] += 1.0
    assert store.verify() == []


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
        with pytest.raises((TypeError, ValueError), match="tenant"):
            store.generate([5, 6, 7], tenant=tenant, max_new_tokens=NEW)
        with pytest.raises((TypeError, ValueError), match="tenant"):
            store.lookup([5, 6, 7], tenant=tenant)
    with pytest.raises(TypeError, match="reference: chosen by the store"):  # not Python's "multiple values"
        store.generate([5, 6, 7], reference=None)
    with pytest.raises(ValueError, match="retain_ratio"):
        KVStore(ReuseEngine(model, FakeTokenizer(), ReuseConfig(retain_ratio=0.5)))
    assert len(store) == 0


def test_serving_choices_and_flags_are_refused_by_name(engine):
    """The store chooses the reference, the gate and prefix_only: a caller's value is refused by name (not with
    Python's "multiple values"). `shared` is True or False only, in generate and lookup: a truthy "false" would
    publish a private prompt into the shared namespace. Nothing is stored."""
    store = KVStore(engine)
    prompt = base_tokens(40, seed=79)
    for name, value in (("reference", None), ("return_entry", False), ("min_similarity", 0.0),
                        ("prefix_only", False)):
        with pytest.raises(TypeError, match=f"{name}: chosen by the store"):
            store.generate(prompt, tenant="t", max_new_tokens=NEW, **{name: value})
    for shared in ("false", 1, None):
        with pytest.raises(TypeError, match="shared"):
            store.generate(prompt, tenant="t", shared=shared, max_new_tokens=NEW)
        with pytest.raises(TypeError, match="shared"):
            store.lookup(prompt, tenant="t", shared=shared)
    assert len(store) == 0
