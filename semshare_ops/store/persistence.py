"""A store on disk: one directory, switched from one saved generation to the next by a single rename, checked whole
when it is loaded.

Layout (format version 4):
- `index.json`, the commit point: format name and version, the generation, the name of that generation's tensor
  file, the engine fingerprint, the store settings and counters, and per entry its metadata (id, tenant, shared
  flag, parent, edit script, depth, tier, recency stamp, exact prefix) and the SHA-256 checksum of its tensors, in
  LRU order, device tier first, so that restoring in file order rebuilds both LRU orders; last, the SHA-256 of all
  that (`checksum`, over its canonical JSON: `index_checksum`). JSON: small, and readable by anyone inspecting a
  store.
- `entries-<generation>-<random>.safetensors`, named by the index and by nothing else: every entry's token_ids,
  keys, values, codes and embedding as `<id>.<field>` (and `<id>.sentence_embedding`, the retrieval key of a store
  with embedding="minilm": it costs a MiniLM forward to recompute, where the model-embedding key is recomputed from
  the saved embedding in no time).

Why no crash leaves a store that does not load. A save writes the new generation beside the old one and switches
to it with one rename:
1. the tensor file, under a name no other file has, fsync'd; then the directory, so that the name is durable too;
2. the new index under a temporary name of its own, fsync'd;
3. `os.replace` of that over `index.json`: the one commit point. A rename within a directory is atomic, so a
   reader, or a restart after a crash at any instant, finds the old index or the new one, never a mix;
4. the directory fsync'd (the rename is durable), and only then the previous generation's files removed.
A directory the save creates, and every parent it creates with it, has its name fsync'd in its parent first.
Before 3 the old index still names the old tensor file, untouched; from 3 on the new index names a file that is
already on disk. Whatever else lies in the directory (a half-written tensor file or temporary index of a save that
died or failed) is named by no index, so a load never reads it and the next save removes it (safetensors' own
temporary name, which carries no mark of this package, only where a store index was already committed). A save that
fails before 3 removes what it wrote and raises; the old generation stays. A save never goes over an index.json of
another program: it refuses the directory by name, with nothing written or removed.

Saves into one directory take turns under an exclusive `flock` of the directory, whether they come from one store,
two stores or two processes (the kernel drops the lock of a saver that dies), and each picks fresh names for the
files it creates, so no two saves ever write one file: the last to commit wins, complete. A save whose directory
was moved, removed or replaced while it waited for the lock is refused, with nothing written (the lock only holds
what it opened; moving a store while a save runs is the caller's to avoid). Loads take no lock: the index they read
names a file that exists, and when a save commits and removes that file before they open it, they read the new index
and start again. Once open, the file is read through that one descriptor (a save removing it meanwhile changes
nothing) into memory the store owns: no loaded tensor is a view of the file on disk. The guarantees rest on POSIX
rename, fsync of a directory and flock (Linux, the package's platform).

Checks at load, each a ValueError naming the file and the field (FileNotFoundError for a missing index or tensor
file), so that no malformed store is served from, and none fails later with a KeyError or a RecursionError:
- the format and its version (version 1, the format before these guarantees, is refused: its saves were not atomic
  and it carried no checksums), and the fingerprint (model and tokenizer) must be the engine's: K/V of another
  model, or token ids of another tokenizer, would be served as if they were this engine's;
- every field of the index is present, of its type and in range, and there is no field this version does not
  write; entry ids are well formed and unique; every parent is stored and no parent chain loops back; an edit
  script spans its parent's tokens and its entry's, and its counts are those of its opcodes;
- the tensor file carries this generation's metadata and exactly the tensors the index names, each of the shape
  and dtype this engine makes (layers, KV heads, head dim, dtype, hidden size, LSH width; one token count across an
  entry's tensors), with token ids inside the vocabulary and the positions the engine serves;
- the index hashes to its own checksum (version 4): the metadata is as saved. A flipped bit there can leave every
  field well formed and still serve wrongly (an entry's exact prefix grown past its exact K/V, its tenant renamed
  into another's namespace), so it is refused like one in the tensors. Versions 2 and 3 had no such checksum;
- each entry's tensors hash to the checksum in the index, taken at save over the very tensors written: flipped bits
  are refused, not served. `KVStore.load(..., verify=False)` skips only the tensors' hashing (a large store loads
  faster; `KVStore.verify()` then finds a damaged entry by the same saved checksums); the index's is always
  checked. Checksums find corruption; they do not authenticate. Whoever can write the directory can make the store
  serve any K/V, with checksums to match: keep it as trusted as the model weights;
- an entry's parent lies in its namespace (the same tenant's private entries, or the shared ones): an entry's K/V
  carry its base's context, so a shared entry served from a private one would publish that tenant's prompt.
Token codes saved under other LSH settings (bits, seed, rope base) are recomputed by the store, not refused: they
are a function of the token ids and the engine.

Saving is split in two: the snapshot (metadata and tensor references, cheap) is taken under the store's index lock,
the copies to CPU, the hashing and the file writes run outside it, so a save does not stall requests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..engine.engine import LSH_SETTINGS, ReferenceEntry, ReuseEngine
from .checks import SETTINGS, check_settings
from .entries import CHECKSUM_FIELDS, ENTRY_ID, Node, tensors_checksum

FORMAT = "semshare_ops.KVStore"
FORMAT_VERSION = 4
# Version 2 had no exact_prefix per entry: its entries load with none (recomputed like any reused K/V; never wrong).
# Versions 2 and 3 had no checksum of the index itself.
READ_VERSIONS = (2, 3, FORMAT_VERSION)
INDEX_FILE = "index.json"
TENSOR_FILE = re.compile(r"entries-\d{8,}-[0-9a-f]{16}\.safetensors")
TEMP_INDEX = re.compile(r"index\.json\.[0-9a-f]{16}\.tmp")
# safetensors' save_file writes through a temporary file of its own beside the target (Rust's tempfile: ".tmp" and six
# random characters) and renames it: a save killed inside save_file leaves one behind.
SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
# The fixed names of format version 1: the previous generation's files when a version-1 store is saved over.
LEGACY_FILES = ("entries.safetensors", "entries.safetensors.tmp", "index.json.tmp")
FIELDS = CHECKSUM_FIELDS  # the tensors of a ReferenceEntry, saved per entry and covered by its checksum
KEY_FIELD = "sentence_embedding"
SHA256 = re.compile(r"[0-9a-f]{64}")
INDEX_FIELDS = ("format", "version", "generation", "fingerprint", "tensors", "config", "engine_lsh", "clock",
                "evictions", "offloads", "entries", "checksum")
UNCHECKED_INDEX_FIELDS = INDEX_FIELDS[:-1]  # versions 2 and 3
ENTRY_FIELDS = ("id", "tenant", "shared", "parent", "depth", "edits", "opcodes", "tier", "stamp", "checksum",
                "key_checksum", "exact_prefix")
LSH_FIELDS = LSH_SETTINGS
EDIT_COUNTS = ("keep", "insert", "delete", "replace")
OPCODE_TAGS = {"e": "keep", "i": "insert", "d": "delete", "r": "replace"}
TIERS = ("device", "offload")
_OPEN_ATTEMPTS = 4  # index reads when concurrent saves keep replacing the tensor file just named


@dataclasses.dataclass(frozen=True)
class Counters:
    """The store's counters, saved so that a loaded store goes on with the same recency clock and totals."""

    clock: int
    evictions: int
    offloads: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a save writes: the index without its per-generation fields and checksums, and per entry its tensors,
    its sentence key (or None) and the checksum taken when it was stored (or None)."""

    index: Dict
    entries: List[Tuple[str, ReferenceEntry, Optional[torch.Tensor], Optional[str]]]


def index_checksum(index: Dict) -> str:
    """SHA-256 of an index without its `checksum` field, over its canonical JSON (sorted keys, no spaces, ASCII):
    the same digest for the dict a save writes and the one a load parses from it."""
    body = {name: value for name, value in index.items() if name != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def engine_lsh(engine: ReuseEngine) -> Dict:
    """The engine settings its token codes depend on."""
    return dict(zip(LSH_FIELDS, engine.codes_lsh))


def snapshot(engine: ReuseEngine, fingerprint: str, config: Dict, counters: Counters, nodes: Iterable[Node],
             sentence_keys: bool) -> Snapshot:
    """Metadata and tensor references of `nodes` (in LRU order, device tier first), every one made under the engine
    weights of `fingerprint`; run it under the index lock."""
    nodes = list(nodes)
    other = next((n.id for n in nodes if n.entry.fingerprint != fingerprint), None)
    if other is not None:  # the index vouches for one fingerprint: another entry's would be served after a load
        raise ValueError(f"snapshot: entry {other} was made under other weights than the engine's now")
    meta = [{"id": n.id, "tenant": n.tenant, "shared": n.shared, "parent": n.parent, "depth": n.depth,
             "edits": n.edits, "opcodes": None if n.opcodes is None else [list(op) for op in n.opcodes],
             "tier": n.tier, "stamp": n.stamp, "exact_prefix": n.entry.exact_prefix} for n in nodes]
    index = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint, "config": config,
             "engine_lsh": engine_lsh(engine), "clock": counters.clock, "evictions": counters.evictions,
             "offloads": counters.offloads, "entries": meta}
    entries = [(n.id, n.entry, n.key if sentence_keys else None, n.checksum) for n in nodes]
    return Snapshot(index, entries)


# ---- saving ------------------------------------------------------------------------------------------------------

def write(directory: Path, take_snapshot: Callable[[], Snapshot]) -> Dict[str, str]:
    """Save a new generation into `directory` (created if missing; module doc for the steps and why). The snapshot
    is taken once this save holds the directory, so that of two saves of one store the later state commits last.
    Returns the checksum written per entry id."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    _make_directory(directory)
    with _locked(directory) as dir_fd:
        _check_still_at(directory, dir_fd)
        committed = _committed_index(directory)
        snap = take_snapshot()
        generation = _committed_generation(committed) + 1
        tensor_name = f"entries-{generation:08d}-{secrets.token_hex(8)}.safetensors"
        temp_index = f"{INDEX_FILE}.{secrets.token_hex(8)}.tmp"
        written: List[str] = []
        try:
            tensors, checksums, key_checksums = _gather(snap)
            metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "generation": str(generation),
                        "fingerprint": snap.index["fingerprint"]}
            written.append(tensor_name)
            try:
                save_file(tensors, str(directory / tensor_name), metadata=metadata)
            except SafetensorError as err:  # its I/O failures (a read-only directory, a full disk): an OSError
                raise OSError(f"save: writing {directory / tensor_name} failed: {err}") from err
            del tensors
            # safetensors creates the file 0600 (its temporary file's mode); the index gets the umask's mode, and a
            # store whose index another user can read but not its tensors would not load for them.
            os.chmod(directory / tensor_name, _new_file_mode())
            _fsync_file(directory / tensor_name)
            os.fsync(dir_fd)  # the tensor file's name is durable before any index names it
            index = dict(snap.index, generation=generation, tensors=tensor_name)
            index["entries"] = [dict(meta, checksum=checksums[meta["id"]], key_checksum=key_checksums[meta["id"]])
                                for meta in snap.index["entries"]]
            index = {name: index[name] for name in UNCHECKED_INDEX_FIELDS}
            index["checksum"] = index_checksum(index)
            written.append(temp_index)
            _write_file(directory / temp_index, json.dumps(index, indent=1).encode())
            os.replace(directory / temp_index, directory / INDEX_FILE)  # the commit point
        except BaseException:
            for name in written:  # nothing names them; remove them now rather than at the next save
                with contextlib.suppress(OSError):
                    os.remove(directory / name)
            raise
        # Only once the new index is durable may the old generation go: a crash before this fsync can bring the old
        # index back, and it needs its tensor file.
        try:
            os.fsync(dir_fd)
        except OSError as err:  # past the commit point: say so, rather than let it read as a save that failed
            raise OSError(err.errno, f"save: the new generation is committed in {directory}, but the directory's "
                                     f"fsync failed ({err.strerror or err}): it may not survive a power loss, so "
                                     "the previous generation's files are kept") from err
        _remove_stale(directory, keep=tensor_name, committed=committed)
    return checksums


def _gather(snap: Snapshot) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], Dict[str, Optional[str]]]:
    """The tensors to write (CPU, owning their storage) and the checksums of exactly those tensors. An entry whose
    tensors no longer hash to the checksum taken when it was stored is refused: a save must not make damage in
    memory durable."""
    tensors, checksums, key_checksums, changed = {}, {}, {}, []
    for entry_id, entry, key, stored in snap.entries:
        fields = [_owned(getattr(entry, name)) for name in FIELDS]
        checksums[entry_id] = tensors_checksum(fields)
        if stored is not None and stored != checksums[entry_id]:
            changed.append(entry_id)
        tensors.update((f"{entry_id}.{name}", t) for name, t in zip(FIELDS, fields))
        key_checksums[entry_id] = None
        if key is not None:
            tensors[f"{entry_id}.{KEY_FIELD}"] = key = _owned(key)
            key_checksums[entry_id] = tensors_checksum([key])
    if changed:
        raise RuntimeError(f"save: entries {', '.join(changed)} no longer match the checksum taken when they were "
                           "stored (their tensors changed in memory); nothing was written. Remove them and save "
                           "again")
    return tensors, checksums, key_checksums


def _make_directory(directory: Path) -> None:
    """Create `directory` with whatever parents it lacks, each durable: a directory's name lives in its parent, so
    the parent of every level created is fsync'd (a crash must not lose a committed store by losing the name of a
    directory above it)."""
    missing = []
    level = directory
    while not level.is_dir() and level != level.parent:
        missing.append(level)
        level = level.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_directory(created.parent)


def _check_still_at(directory: Path, dir_fd: int) -> None:
    """Refuse a save whose directory was moved, removed or replaced while it waited for the lock: its files are
    written by path, and would land beside a directory it does not hold (or nowhere), while the lock and the fsyncs
    went to the one it opened."""
    held = os.fstat(dir_fd)
    try:
        now = os.stat(directory)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise FileNotFoundError(errno.ENOENT, f"save: the directory was moved, removed or replaced while this save "
                                              "waited for its lock; nothing was written", str(directory))


@contextlib.contextmanager
def _locked(directory: Path):
    """An open descriptor of `directory`, held under an exclusive flock (released when it is closed, or when the
    process dies)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        # Unlocked explicitly first: if close() failed, the descriptor (and with it the lock) would stay held, and
        # the next save in this process would wait on it forever.
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _committed_index(directory: Path) -> Optional[Dict]:
    """The index a save would replace: None when there is none. An index.json that is not a KVStore index, or
    cannot be read as JSON (some other program's, or a store index damaged past recognition: a committed index
    is always whole JSON), is refused, naming the directory: a save there would replace it and remove files it does
    not know to be its own. (One that does not read as JSON was replaced, as a damaged index of a store.)"""
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"save: directory {directory} holds an {INDEX_FILE} that cannot be read as JSON ("
                         f"{type(err).__name__}): another program's, or a damaged store index; nothing was written "
                         "(move it away to save here)") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"save: directory {directory} holds an {INDEX_FILE} that is not a KVStore index; nothing "
                         "was written (save the store into a directory of its own)")
    return index


def _committed_generation(committed: Optional[Dict]) -> int:
    """The committed index's generation, -1 when it has none that a load accepts (the generation only orders the
    tensor files' names; what makes them unique is their random part)."""
    generation = (committed or {}).get("generation")
    return generation if _is_int(generation) and generation >= 0 else -1


def _new_file_mode() -> int:
    """The mode a file created 0o644 gets under this process's umask (read from /proc: os.umask sets it too, which
    another thread creating a file meanwhile would see)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o644 & ~umask


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(directory: Path, keep: str, committed: Optional[Dict]) -> None:
    """Remove every file of an earlier generation or a dead save, but `keep`; a file that will not go is left for
    the next save (nothing reads it). Names with a random part of this format's own are this package's wherever
    they lie; the generic ones (safetensors' ".tmpXXXXXX", version 1's fixed names) only where a store index
    was committed before this save (version 1's only over a version-1 index), so that no file of someone else's is
    taken for a leftover."""
    ours = bool(committed)
    legacy = ours and committed.get("version") == 1
    for path in directory.iterdir():
        name = path.name
        if name != keep and (TENSOR_FILE.fullmatch(name) or TEMP_INDEX.fullmatch(name)
                             or (legacy and name in LEGACY_FILES) or (ours and SAFETENSORS_TEMP.fullmatch(name))):
            with contextlib.suppress(OSError):
                os.remove(path)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses views sharing one)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


# ---- loading -----------------------------------------------------------------------------------------------------

class SavedStore:
    """A saved store, read and checked against `engine` (module doc: the checks).

    `config` holds the saved store settings; `codes_match` says whether the saved token codes are the engine's;
    `restore` builds the entries.
    """

    def __init__(self, directory: Path, engine: ReuseEngine):
        from safetensors import SafetensorError, safe_open

        self.engine = engine
        self.index_path = directory / INDEX_FILE
        index = None
        for attempt in range(_OPEN_ATTEMPTS):
            index = _check_index(_read_index(self.index_path), self.index_path, engine)
            self.tensor_path = tensor_path = directory / index["tensors"]
            try:
                metadata, tensors = _read_tensor_file(tensor_path, safe_open)
                names = set(tensors)
                break
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                # A save may have committed a newer generation and removed this one's file since the index was read.
                again = _read_index(self.index_path) if self.index_path.is_file() else None
                if isinstance(again, dict) and again.get("tensors") != index["tensors"] and \
                        attempt + 1 < _OPEN_ATTEMPTS:
                    continue
                if not tensor_path.is_file():
                    raise FileNotFoundError(f"load: tensor file {tensor_path} named by {self.index_path} is "
                                            "missing") from None
                raise ValueError(f"load: tensor file {tensor_path} is corrupt or unreadable ({err})") from None
        expected = {"format": FORMAT, "version": str(index["version"]), "generation": str(index["generation"]),
                    "fingerprint": index["fingerprint"]}
        for name, value in expected.items():
            if metadata.get(name) != value:
                raise _bad(tensor_path, f"metadata.{name}", f"expected {value!r} (the index's), got "
                                                            f"{metadata.get(name)!r}")
        wanted = {f"{meta['id']}.{name}" for meta in index["entries"] for name in FIELDS}
        wanted |= {f"{meta['id']}.{KEY_FIELD}" for meta in index["entries"] if meta["key_checksum"] is not None}
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        if missing:
            raise _bad(tensor_path, missing[0], "tensor is missing")
        if extra:
            raise _bad(tensor_path, extra[0], "tensor not named by the index")
        self.index, self.tensors = index, tensors

    @property
    def config(self) -> Dict:
        return dict(self.index["config"])

    @property
    def codes_match(self) -> bool:
        """Whether the saved token codes were made with the engine's LSH settings (else the store rehashes)."""
        return self.index["engine_lsh"] == engine_lsh(self.engine)

    def restore(self, sentence_keys: bool, verify: bool) -> Tuple[Counters, List[Node]]:
        """The saved counters and entries, in file order (LRU, device tier first), each checked against the engine
        and, with `verify`, against its saved checksum.

        Each node's K/V are on CPU, whatever its tier (the store moves those its device tier keeps); its `key` is the
        saved sentence embedding when `sentence_keys` and the file has one, else None (the store computes it); its
        `checksum` is the saved one; its children are not filled in.
        """
        index, tensors, path = self.index, self.tensors, self.tensor_path
        engine = self.engine
        counters = Counters(index["clock"], index["evictions"], index["offloads"])
        shapes = _engine_shapes(engine, index["engine_lsh"])
        lengths: Dict[str, int] = {}
        key_size = None  # one size across the sentence keys: they are stacked into one matrix
        nodes = []
        for i, meta in enumerate(index["entries"]):
            entry_id = meta["id"]
            fields = {name: tensors[f"{entry_id}.{name}"] for name in FIELDS}
            lengths[entry_id] = _check_entry_tensors(path, entry_id, fields, shapes)
            if meta["exact_prefix"] > lengths[entry_id]:
                raise _bad(self.index_path, f"entries[{i}].exact_prefix", f"{meta['exact_prefix']} exceeds the "
                                                                          f"entry's {lengths[entry_id]} tokens")
            if verify and tensors_checksum(fields[name] for name in FIELDS) != meta["checksum"]:
                raise _bad(path, entry_id, "its tensors do not match the checksum saved in the index (the file is "
                                           "damaged)")
            key = None
            if meta["key_checksum"] is not None:
                key = tensors[f"{entry_id}.{KEY_FIELD}"]
                _check_sentence_key(path, entry_id, key, key_size)
                key_size = key.numel()
                if verify and tensors_checksum([key]) != meta["key_checksum"]:
                    raise _bad(path, f"{entry_id}.{KEY_FIELD}", "does not match the checksum saved in the index "
                                                                "(the file is damaged)")
            # The saved codes are made with the saved LSH settings; a store rehashes those of other settings
            # (KVStore.load), and the rehashed entry is the engine's.
            entry = ReferenceEntry(fingerprint=engine.fingerprint, exact_prefix=meta["exact_prefix"],
                                   codes_lsh=tuple(index["engine_lsh"][name] for name in LSH_FIELDS), **fields)
            opcodes = None if meta["opcodes"] is None else tuple(tuple(op) for op in meta["opcodes"])
            nodes.append(Node(entry_id, entry, meta["tenant"], meta["shared"], key if sentence_keys else None,
                              meta["parent"], meta["depth"], meta["edits"], opcodes, meta["tier"], meta["stamp"],
                              checksum=meta["checksum"]))
        for i, meta in enumerate(index["entries"]):
            if meta["parent"] is not None:
                _check_edit_script(self.index_path, f"entries[{i}]", meta, lengths[meta["parent"]],
                                   lengths[meta["id"]])
        return counters, nodes


def _read_tensor_file(path: Path, safe_open) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, read through one open descriptor, into memory of their own.

    safe_open opens its path twice (the header, then a memory map for the tensors): between the two a save could
    commit and remove the file. Through /proc/self/fd both opens reach the one file this descriptor holds, removed
    or not. And the tensors are copied out of the map: views of it would change under an in-place rewrite of the
    file (cp, rsync --inplace) and fault (SIGBUS) if it were truncated, after the load had checked them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with safe_open(f"/proc/self/fd/{fd}", framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    finally:
        os.close(fd)
    return metadata, tensors


def _bad(path: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"load: {path}: {field}: {problem}")


def _read_index(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"load: no KVStore index at {path}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, an int past Python's digits
        raise ValueError(f"load: {path} is not a valid KVStore index ({err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(path: Path, field: str, value, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        raise _bad(path, field, f"expected an int >= {minimum}, got {value!r}")
    return value


def _fields(path: Path, where: str, obj, names: Iterable[str]) -> Dict:
    """`obj` as a JSON object with exactly the fields `names`."""
    if not isinstance(obj, dict):
        raise _bad(path, where or "(top level)", f"expected a JSON object, got {type(obj).__name__}")
    prefix = f"{where}." if where else ""
    names = tuple(names)
    for name in names:
        if name not in obj:
            raise _bad(path, prefix + name, "missing")
    for name in obj:
        if name not in names:
            raise _bad(path, prefix + str(name), "not a field of this format version")
    return obj


def _check_index(index, path: Path, engine: ReuseEngine) -> Dict:
    """The index, every field checked (module doc); ValueError naming the file and the field otherwise."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _bad(path, "format", f"not a KVStore index ({FORMAT!r} expected)")
    version = index.get("version")
    if version == 1:
        raise _bad(path, "version", "format version 1 (saves that were not atomic, no checksums) is not read by "
                                    f"this build, which reads versions {', '.join(map(str, READ_VERSIONS))}: build "
                                    "the store again")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise _bad(path, "version", f"unknown KVStore format version {version!r}; this build reads versions "
                                    f"{', '.join(map(str, READ_VERSIONS))}")
    _fields(path, "", index, INDEX_FIELDS if version >= 4 else UNCHECKED_INDEX_FIELDS)
    # Taken before the checks below normalise anything; compared after them, so that a malformed field is named
    # as such and a well-formed one that is not as saved is still refused.
    try:
        digest = index_checksum(index) if version >= 4 else None
    except ValueError as err:  # NaN or infinity somewhere: not JSON as a save writes it
        raise _bad(path, "checksum", f"the index holds a value no save writes ({err})") from None
    if index["fingerprint"] != engine.fingerprint:
        raise _bad(path, "fingerprint", f"the store was written for another model or tokenizer (fingerprint "
                                        f"{index['fingerprint']!r}, this engine's is {engine.fingerprint})")
    _int(path, "generation", index["generation"])
    if not isinstance(index["tensors"], str) or not TENSOR_FILE.fullmatch(index["tensors"]):
        raise _bad(path, "tensors", f"expected a tensor file name like entries-<generation>-<16 hex>.safetensors "
                                    f"(no directory), got {index['tensors']!r}")
    if not index["tensors"].startswith(f"entries-{index['generation']:08d}-"):
        raise _bad(path, "tensors", f"{index['tensors']!r} is not a file of generation {index['generation']}")
    try:
        index["config"] = check_settings(_fields(path, "config", index["config"], SETTINGS), "config.")
    except (TypeError, ValueError) as err:  # a malformed file is a ValueError, whatever the field's fault
        raise ValueError(f"load: {path}: {err}") from None
    lsh = _fields(path, "engine_lsh", index["engine_lsh"], LSH_FIELDS)
    _int(path, "engine_lsh.lsh_bits", lsh["lsh_bits"], 1)
    _int(path, "engine_lsh.lsh_seed", lsh["lsh_seed"], -(1 << 63))
    base = lsh["embedding_rope_base"]
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base):
        raise _bad(path, "engine_lsh.embedding_rope_base", f"expected a finite number, got {base!r}")
    for name in ("clock", "evictions", "offloads"):
        _int(path, name, index[name])
    entries = index["entries"]
    if not isinstance(entries, list):
        raise _bad(path, "entries", f"expected a list, got {type(entries).__name__}")
    where: Dict[str, int] = {}
    for i, meta in enumerate(entries):
        if index["version"] == 2 and isinstance(meta, dict):
            meta["exact_prefix"] = 0
        _check_entry_meta(path, i, meta, index["clock"])
        if meta["id"] in where:
            raise _bad(path, f"entries[{i}].id", f"{meta['id']!r} is stored twice (also entries[{where[meta['id']]}])")
        where[meta["id"]] = i
    for i, meta in enumerate(entries):
        if meta["parent"] is not None and meta["parent"] not in where:
            raise _bad(path, f"entries[{i}].parent", f"{meta['parent']!r} is not a stored entry")
    _check_acyclic(path, entries, where)
    if digest is not None and digest != index["checksum"]:
        raise _bad(path, "checksum", "the index does not match the checksum saved with it (the file is damaged)")
    for i, meta in enumerate(entries):
        parent = entries[where[meta["parent"]]] if meta["parent"] is not None else None
        if parent is not None and _namespace(parent) != _namespace(meta):
            raise _bad(path, f"entries[{i}].parent", f"{meta['parent']!r} lies in {_namespace(parent)}, this entry "
                                                     f"in {_namespace(meta)}: its K/V carry its parent's context. "
                                                     "Stores saved before 2026-12-04 could serve a shared request "
                                                     "from its tenant's private entries: build the store again")
    return index


def _namespace(meta: Dict) -> str:
    return "the shared namespace" if meta["shared"] else f"tenant {meta['tenant']!r}'s namespace"


def _check_entry_meta(path: Path, i: int, meta, clock: int) -> None:
    at = f"entries[{i}]"
    _fields(path, at, meta, ENTRY_FIELDS)
    if not isinstance(meta["id"], str) or not ENTRY_ID.fullmatch(meta["id"]):
        raise _bad(path, f"{at}.id", f"expected 'kv' and 16 hex digits, got {meta['id']!r}")
    if not isinstance(meta["tenant"], str) or not meta["tenant"]:
        raise _bad(path, f"{at}.tenant", f"expected a non-empty str, got {meta['tenant']!r}")
    if not isinstance(meta["shared"], bool):
        raise _bad(path, f"{at}.shared", f"expected true or false, got {meta['shared']!r}")
    if meta["parent"] is not None and not isinstance(meta["parent"], str):
        raise _bad(path, f"{at}.parent", f"expected null or an entry id, got {meta['parent']!r}")
    if meta["parent"] == meta["id"]:
        raise _bad(path, f"{at}.parent", f"{meta['id']!r} names itself as its parent")
    _int(path, f"{at}.depth", meta["depth"])
    stamp = _int(path, f"{at}.stamp", meta["stamp"])
    _int(path, f"{at}.exact_prefix", meta["exact_prefix"])
    if stamp > clock:
        raise _bad(path, f"{at}.stamp", f"{stamp} is past the store's clock ({clock})")
    if meta["tier"] not in TIERS:
        raise _bad(path, f"{at}.tier", f"expected one of {', '.join(map(repr, TIERS))}, got {meta['tier']!r}")
    for name in ("checksum", "key_checksum"):
        value = meta[name]
        if not (isinstance(value, str) and SHA256.fullmatch(value)) and not (name == "key_checksum" and value is None):
            raise _bad(path, f"{at}.{name}", f"expected a SHA-256 hex digest, got {value!r}")
    if meta["parent"] is None:
        for name in ("edits", "opcodes"):
            if meta[name] is not None:
                raise _bad(path, f"{at}.{name}", "expected null for an entry without a parent")
        return
    edits = _fields(path, f"{at}.edits", meta["edits"], EDIT_COUNTS)
    for name in EDIT_COUNTS:
        _int(path, f"{at}.edits.{name}", edits[name])
    opcodes = meta["opcodes"]
    if not isinstance(opcodes, list):
        raise _bad(path, f"{at}.opcodes", f"expected a list, got {type(opcodes).__name__}")
    for k, op in enumerate(opcodes):
        if not (isinstance(op, list) and len(op) == 5 and isinstance(op[0], str) and op[0] in OPCODE_TAGS
                and all(map(_is_int, op[1:]))):
            raise _bad(path, f"{at}.opcodes[{k}]", f"expected [tag, i1, i2, j1, j2] with tag one of e, i, d, r, "
                                                   f"got {op!r}")


def _check_acyclic(path: Path, entries: List[Dict], where: Dict[str, int]) -> None:
    """No parent chain comes back to where it started (a loop would hang or blow the stack of every walk up the
    tree)."""
    done = set()
    for i, meta in enumerate(entries):
        seen, node = [], meta
        while node is not None and node["id"] not in done:
            if node["id"] in seen:
                raise _bad(path, f"entries[{where[node['id']]}].parent", f"the parent chain of {node['id']!r} "
                                                                         "loops back to it")
            seen.append(node["id"])
            node = entries[where[node["parent"]]] if node["parent"] is not None else None
        done.update(seen)


def _check_edit_script(path: Path, at: str, meta: Dict, parent_tokens: int, tokens: int) -> None:
    """The opcodes tile the parent's tokens and the entry's, each tag spans what it should, and the counts are the
    opcodes' (what `tree.edit_script` writes)."""
    counts = dict.fromkeys(EDIT_COUNTS, 0)
    i = j = 0
    for k, (tag, i1, i2, j1, j2) in enumerate(meta["opcodes"]):
        spans = {"e": i2 - i1 == j2 - j1 > 0, "i": i1 == i2 and j2 > j1, "d": j1 == j2 and i2 > i1,
                 "r": i2 > i1 and j2 > j1}
        if (i1, j1) != (i, j) or not spans[tag]:
            raise _bad(path, f"{at}.opcodes[{k}]", f"{[tag, i1, i2, j1, j2]} does not continue the script at "
                                                   f"({i}, {j}) with a valid span")
        counts[OPCODE_TAGS[tag]] += (i2 - i1) if tag == "d" else (j2 - j1)
        i, j = i2, j2
    if (i, j) != (parent_tokens, tokens):
        raise _bad(path, f"{at}.opcodes", f"end at ({i}, {j}), not at the parent's and the entry's token counts "
                                          f"({parent_tokens}, {tokens})")
    if counts != meta["edits"]:
        raise _bad(path, f"{at}.edits", f"{meta['edits']} are not the counts of its opcodes ({counts})")


@dataclasses.dataclass(frozen=True)
class _Shapes:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    hidden: int
    code_words: int
    vocab: int
    max_positions: Optional[int]


def _engine_shapes(engine: ReuseEngine, saved_lsh: Dict) -> _Shapes:
    weight = engine.decoder.embed_tokens.weight
    return _Shapes(engine.num_layers, engine.kv_heads, engine.head_dim, engine.kv_dtype, weight.shape[1],
                   math.ceil(saved_lsh["lsh_bits"] / 64), engine.model.config.vocab_size, engine.max_positions)


def _check_entry_tensors(path: Path, entry_id: str, fields: Dict[str, torch.Tensor], s: _Shapes) -> int:
    """An entry's tensors as this engine makes them; returns its token count."""
    ids = fields["token_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() == 0:
        raise _bad(path, f"{entry_id}.token_ids", f"expected a non-empty int64 vector, got {ids.dtype} "
                                                  f"{tuple(ids.shape)}")
    n = ids.numel()
    if s.max_positions and n > s.max_positions:
        raise _bad(path, f"{entry_id}.token_ids", f"{n} tokens exceed the engine's {s.max_positions} positions")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= s.vocab:
        raise _bad(path, f"{entry_id}.token_ids", f"token id {low if low < 0 else high} is outside the "
                                                  f"vocabulary [0, {s.vocab})")
    kv_shape = (s.layers, n, s.kv_heads, s.head_dim)
    expected = {"keys": (s.dtype, kv_shape), "values": (s.dtype, kv_shape),
                "codes": (torch.int64, (n, s.code_words)), "embedding": (torch.float32, (s.hidden,))}
    for name, (dtype, shape) in expected.items():
        t = fields[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise _bad(path, f"{entry_id}.{name}", f"expected {dtype} {shape} for this engine, got {t.dtype} "
                                                   f"{tuple(t.shape)}")
    if not torch.isfinite(fields["embedding"]).all():
        raise _bad(path, f"{entry_id}.embedding", "holds values that are not finite")
    return n


def _check_sentence_key(path: Path, entry_id: str, key: torch.Tensor, size: Optional[int]) -> None:
    if key.dtype != torch.float32 or key.dim() != 1 or key.numel() == 0 or not torch.isfinite(key).all():
        raise _bad(path, f"{entry_id}.{KEY_FIELD}", f"expected a finite float32 vector, got {key.dtype} "
                                                    f"{tuple(key.shape)}")
    if size is not None and key.numel() != size:
        raise _bad(path, f"{entry_id}.{KEY_FIELD}", f"has {key.numel()} dimensions where the others have {size}")
