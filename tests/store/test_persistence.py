"""save / load (semshare_ops/store/persistence.py): round trip, overrides, refusals."""

import json

import pytest

from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.store.entries import entry_checksum
from semshare_ops.store.store import KVStore

from engine_testutils import FakeTokenizer, build_model
from store_testutils import NEW, TOKEN_BYTES, base_tokens, replace

pytestmark = pytest.mark.usefixtures("one_thread")


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
