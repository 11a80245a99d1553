"""`KVStore`: serving requests from stored bases, tenants and locks; it glues retrieval, tree, tiers and persistence.

Steps 1 (retrieve: retrieval.py) and 2 (expand over the DELTA tree: tree.py) give the candidate bases of a request;
this module does the rest:

3. **Pick the cheapest base.** Every candidate is aligned with the request by `engine.match` (no model call); its
   cost is the number of prompt tokens left unmatched, i.e. recomputed whatever `recompute_ratio` says. A candidate
   is usable when it matches at least `config.min_similarity` of the request's tokens (the engine's own gate) or
   shares an exact common prefix of at least `min_reuse_tokens` tokens with it, within the rows it holds exactly
   (an earlier turn of a growing chat history, a common system prompt: those K/V are exactly what a full prefill
   computes, however small a share of the request they cover). A base under the gate serves that prefix only, as a
   prefix cache would, and every other position is computed in full (`engine.generate(prefix_only=True)`): below
   the gate the request gets a full prefill's result, for less work ("prefix" is not "the whole base": a
   tokenizer may merge the base's last token with the text that follows it), and serving from it keeps the new
   entry within `max_depth`, and it matches at least `min_reuse_tokens` (16) tokens (fewer do not pay for the reuse
   path's fixed overhead). The base is the usable candidate of least cost; ties go to the shallower one, then the
   more recently used. No usable candidate: a full prefill, and the entry is a new root.
4. **Serve and store.** `engine.generate(..., reference=base, return_entry=True)`; the request's own prompt K/V
   (`out.entry`: reused and recomputed K/V, as KVShare stores them) enter the store as a child of the base.

Entries are never written once stored: serving only reads them (docs/contract.md section 4). `out.entry` of a store
request is the stored entry itself: treat it as read-only. An entry bigger than `capacity_bytes` is served but not
stored (`request_id` is None).

Tenants. A stored entry lives in one namespace: its tenant's, or the shared namespace when stored with
`shared=True`. A request sees only the namespace its own entry goes into: its tenant's, or with `shared=True` the
shared one, not its tenant's private entries as well. An entry's K/V carry its base's context (the rows kept from
the base were computed after the base's text), so a shared entry served from a private one would hand that prompt to
every tenant; a namespace is a tree of its own. Cross-tenant reuse is off by default on purpose: whether a prompt is
served from a cache is visible in its latency, so a shared cache tells one tenant what others have asked (a known
timing side channel; vLLM's `cache_salt` exists for the same reason). Opt in per request only for data that is not
secret.

Threads. `generate` may be called from many threads. The store's index (the tree and its nodes, the tiers, the
retrieval index, the counters) is guarded by one lock held for short sections only (retrieval, insertion, eviction).
Model calls (tokenizer, embedding lookups, the engine's fingerprint, alignment with its LSH lookups,
`engine.generate`) and every read of the engine's config are serialised by a lock per model (`model_lock`), shared
by every store on every engine of that model: the HF model and the batch-1 engine are not made for concurrent
forwards (two engines may share one model's modules, and what one sets on them, the other would run into), so
threads give no parallel prefill, only a store that stays consistent under concurrent use. A thread that changes the
engine's config while a store serves from it (`engine.using`) holds `model_lock` around the change: the store then
judges and serves each request by one config, the engine's own (it read another thread's temporary gate).

Weights changed in place. An engine whose weights change takes its fingerprint again and refuses the entries made
before as references (docs/contract.md section 4). The store drops them when a request or a save first sees the
new fingerprint (they would fail every request that retrieved one, and a save would have written them under the new
weights' fingerprint, to be served after a load), and does not store an entry made under weights that changed while
its request was served (`request_id` None).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from typing import Dict, Iterator, List, Optional, Union

import torch

from ..engine import matching
from ..engine.engine import GenerationOutput, ReferenceEntry, ReuseEngine
from . import persistence
from .checks import (SETTINGS, check_bool, check_directory, check_entry_id, check_int, check_settings,
                     check_tenant)
from .entries import SHARED, Node, StoredEntry, entry_checksum, new_entry_id
from .retrieval import Prompt, PromptKeys, Request, RetrievalIndex
from .tiers import Tiers
from .tree import DeltaTree, depth_after, edit_script

# One lock per model, shared by every store on every engine of it: model calls are serialised.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def engine_lock(engine: ReuseEngine) -> threading.RLock:
    """The lock that serialises model calls on `engine`: one per model, the same object for every store on every
    engine of that model (engines may share one: the tests' two matchers do)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(engine.model)
        if lock is None:
            lock = _MODEL_LOCKS[engine.model] = threading.RLock()
        return lock


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
class _Choice:
    base: Optional[ReferenceEntry]  # the base's entry as retrieved (the node may be offloaded or evicted since)
    base_id: Optional[str]
    cost: int
    depth: int
    chain: List[str]  # the base's path root -> base at lookup time (to re-parent if the base leaves meanwhile)
    candidates: Dict[str, int]
    gate: Optional[float] = None  # the engine's similarity gate for this request
    prefix_only: bool = False  # a base under the gate: only its exact common prefix is taken (engine.generate)


class KVStore:
    """Multi-tenant store of prompt KV caches; serves each request from its cheapest stored base (package doc).

    Arguments (each type- and range-checked: TypeError or ValueError naming it): `capacity_bytes` (int >= 1)
    bounds the device tier's K/V bytes; `candidates` (>= 1) is N of the embedding top-N; `embedding` is "model" or
    "minilm"; `max_depth` (>= 0) bounds the reuse hops behind any stored entry; `offload_bytes` (>= 0) sizes the CPU
    tier; `min_reuse_tokens` (>= 1): a base matching fewer of the request's tokens is not worth the reuse path's
    overhead; `checksums=True` records a SHA-256 of every entry when it is stored, which `verify()` and `save`
    check (every saved or loaded entry has one either way).
    """

    def __init__(self, engine: ReuseEngine, capacity_bytes: int = 1 << 30, candidates: int = 4,
                 embedding: str = "model", max_depth: int = 4, offload_bytes: int = 0, min_reuse_tokens: int = 16,
                 checksums: bool = False):
        if not isinstance(engine, ReuseEngine):
            raise TypeError(f"engine: expected a ReuseEngine, got {type(engine).__name__}")
        if engine.config.retain_ratio is not None:
            raise ValueError("engine: a store needs every prompt position of every layer; "
                             "use an engine with retain_ratio=None")
        settings = check_settings({"capacity_bytes": capacity_bytes, "candidates": candidates, "embedding": embedding,
                                   "max_depth": max_depth, "offload_bytes": offload_bytes,
                                   "min_reuse_tokens": min_reuse_tokens, "checksums": checksums})
        self.engine = engine
        self.candidates, self.max_depth = settings["candidates"], settings["max_depth"]
        self.checksums, self.min_reuse_tokens = settings["checksums"], settings["min_reuse_tokens"]
        self.evictions = 0  # entries dropped from the store by the byte budgets
        self.offloads = 0  # entries moved from the device tier to the CPU tier
        self._lock = threading.Lock()  # the index: tree, tiers, retrieval index, counters
        self._save_lock = threading.Lock()  # one save of this store at a time (persistence.py: across stores)
        self._engine_lock = engine_lock(engine)
        self._tree = DeltaTree()
        self._tiers = Tiers(settings["capacity_bytes"], settings["offload_bytes"])
        self._index = RetrievalIndex(embedding)
        self._clock = 0
        self._keys = PromptKeys(engine, self._engine_lock, embedding)  # loads MiniLM for embedding="minilm"
        self._weights: Optional[str] = None  # the engine fingerprint every stored entry was made under (index lock)

    # Fixed at construction, hence read-only: the tiers hold the budgets, the retrieval parts the kind of key.
    @property
    def capacity_bytes(self) -> int:
        return self._tiers.capacity_bytes

    @property
    def offload_bytes(self) -> int:
        return self._tiers.offload_bytes

    @property
    def embedding(self) -> str:
        return self._keys.embedding

    @property
    def model_lock(self) -> threading.RLock:
        """The lock that serialises model calls and config reads on this store's model, the same object for every
        store on every engine of that model: hold it around `engine.using` (or any other change of the engine's
        config or weights) while stores serve from the engine (package doc: Threads)."""
        return self._engine_lock

    # ---- serving -----------------------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, tenant: str = "default", shared: bool = False, max_new_tokens: int = 64,
                 **generate_kwargs) -> GenerationOutput:
        """Serve `prompt` from its cheapest visible base (or a full prefill) and store its K/V.

        stats gain `hit` (K/V were loaded from a base: mode "reuse"), `base_id` (that base, else None), `tenant`,
        `shared`, `request_id` (this request's stored entry; None if it is larger than the whole budget, or the
        engine's weights changed while it was served), `depth`, `lookup_ms`; `ttft_ms` counts from this call
        (retrieval and alignment included), `engine_ttft_ms` from the engine call.
        """
        start = time.perf_counter()
        check_tenant(tenant)
        check_bool("shared", shared)
        check_int("max_new_tokens", max_new_tokens, 1)
        for name in ("reference", "return_entry", "min_similarity", "prefix_only"):
            if name in generate_kwargs:
                raise TypeError(f"{name}: chosen by the store, not by the caller")
        request = self._keys.request(prompt, max_new_tokens)  # the engine checks the prompt
        choice = self._choose(request, tenant, shared)
        lookup_s = time.perf_counter() - start
        # The gate goes with the call: the engine's config is never changed, since other threads read it unlocked.
        with self._engine_lock:
            engine_start = time.perf_counter()
            out = self.engine.generate(request.ids, reference=choice.base, max_new_tokens=max_new_tokens,
                                       return_entry=True, min_similarity=choice.gate, prefix_only=choice.prefix_only,
                                       **generate_kwargs)
        hit = out.stats["mode"] == "reuse"
        entry = out.entry
        checksum = entry_checksum(entry) if self.checksums else None
        if hit:
            # An entry whose K/V are all a full prefill's (nothing left reused in any layer) carries no drift.
            parent, depth = choice.base_id, 0 if entry.exact_prefix >= len(request.ids) else choice.depth
            edits, opcodes = edit_script(choice.base.token_ids.tolist(), request.ids)
        else:
            parent, depth, edits, opcodes = None, 0, None, None
        with self._lock:
            base = self._tree.get(choice.base_id) if hit else None
            if base is not None:
                self._touch(base)
            request_id = self._insert(entry, tenant, shared, request.key, parent, depth, edits, opcodes,
                                      choice.chain, checksum)
            stored = self._tree.get(request_id) if request_id is not None else None
        out.entry = stored.entry if stored is not None else entry
        engine_ttft = out.stats["ttft_ms"]
        out.stats.update(hit=hit, base_id=choice.base_id if hit else None, tenant=tenant, shared=shared,
                         request_id=request_id, depth=depth, lookup_ms=lookup_s * 1e3, engine_ttft_ms=engine_ttft,
                         ttft_ms=(engine_start - start) * 1e3 + engine_ttft)
        return out

    def lookup(self, prompt: Prompt, tenant: str = "default", shared: bool = False) -> Lookup:
        """The base `generate` would choose for `prompt` and its cost (prompt tokens recomputed at least), without
        generating or storing anything."""
        check_tenant(tenant)
        check_bool("shared", shared)
        request = self._keys.request(prompt, 0)
        c = self._choose(request, tenant, shared)
        return Lookup(c.base_id, c.cost, len(request.ids), c.depth, c.candidates)

    def _choose(self, request: Request, tenant: str, shared: bool) -> _Choice:
        """Retrieve and expand (under the index lock), align candidates (under the model lock), pick the cheapest
        usable base."""
        namespaces = [SHARED] if shared else [tenant]  # the one the entry goes into (package doc: Tenants)
        total = len(request.ids)
        with self._engine_lock:
            fingerprint = self.engine.fingerprint  # after an in-place change of a weight it hashes them all again
        with self._lock:
            self._drop_other_weights(fingerprint)
            retrieved = self._index.retrieve(request, namespaces, self.candidates)
            if not retrieved:
                return _Choice(None, None, total, 0, [], {})
            candidates = self._tree.expand(retrieved, self.candidates, namespaces)
            snapshot = [(n.id, n.entry, n.depth, n.stamp) for n in candidates]
        best, costs = None, {}
        with self._engine_lock:
            # Read once: this request is judged, and served, by one gate, and tested as the engine tests it (matched
            # / total < gate; matched < gate * total rounds otherwise: 55 of 100 at 0.55 would pass one and fail the
            # other). Alignment reads the config too, and LSH matching looks up the model's embeddings.
            gate = self.engine.config.min_similarity
            matches = [self.engine.match(entry, request.ids) for _, entry, _, _ in snapshot]
        for (entry_id, entry, depth, stamp), match in zip(snapshot, matches):
            cost = total - match.matched
            costs[entry_id] = cost
            base_ids = entry.token_ids.tolist()
            prefix = matching.common_prefix(base_ids, request.ids)
            # Under the gate, an exact common prefix of min_reuse_tokens or more is still taken, as a prefix cache
            # would take it, and nothing else (prefix_only): those K/V are exactly a full prefill's, however small
            # a share of the request they are, and the rest is computed in full. Only the base's own exact rows
            # count: past its exact_prefix a reused entry holds approximate K/V.
            below_gate = match.matched / total < gate
            if below_gate:
                prefix = min(prefix, entry.exact_prefix)
                cost = costs[entry_id] = total - prefix
            # Served from its exact rows only, the entry is exact throughout: no hop of drift (depth 0).
            new_depth = 0 if below_gate else depth_after(depth, len(base_ids), prefix, match.matched)
            if (match.matched < self.min_reuse_tokens
                    or (below_gate and prefix < self.min_reuse_tokens)
                    or new_depth > self.max_depth):
                continue
            rank = (cost, depth, -stamp)
            if best is None or rank < best[0]:
                best = (rank, entry_id, entry, new_depth, below_gate)
        if best is None:
            return _Choice(None, None, total, 0, [], costs)
        (cost, _, _), entry_id, entry, new_depth, below_gate = best
        with self._lock:
            chain = self._tree.chain(entry_id) if entry_id in self._tree else [entry_id]
        return _Choice(entry, entry_id, cost, new_depth, chain, costs, gate, below_gate)

    # ---- the index (callers hold self._lock) -------------------------------------------------------------------

    def _touch(self, node: Node) -> None:
        self._clock += 1
        node.stamp = self._clock
        self._tiers.touch(node)

    def _insert(self, entry: ReferenceEntry, tenant: str, shared: bool, key: torch.Tensor, parent: Optional[str],
                depth: int, edits, opcodes, chain: List[str], checksum: Optional[str]) -> Optional[str]:
        if not self._tiers.fits(entry) or entry.fingerprint != self._weights:
            return None  # too big for the whole budget, or made under weights that changed while it was served
        if parent is not None and parent not in self._tree:
            # The base left while this request was served: hang the entry on its nearest surviving ancestor.
            parent, edits, opcodes = self._tree.surviving_base(chain, entry.token_ids.tolist())
        entry_id = new_entry_id()
        while entry_id in self._tree:
            entry_id = new_entry_id()
        self._clock += 1
        node = Node(entry_id, entry, tenant, bool(shared), key, parent, depth, edits, opcodes, "device",
                    self._clock, checksum=checksum)
        self._add(node)
        try:
            self._enforce_budgets()
        except BaseException:
            # The budgets could not be applied (a copy to the CPU tier failed): this call stores nothing. What other
            # entries moved before the failure stays as it went (each move is whole); the new node, unless the
            # budgets dropped it already, leaves as `remove` takes an entry out.
            if node.id in self._tree:
                self._drop(node)
            raise
        return entry_id

    def _add(self, node: Node) -> None:
        """Put a node into the tree, its tier (as most recent) and the retrieval index."""
        self._tree.add(node)
        self._tiers.add(node)
        self._index.add(node)

    def _drop(self, node: Node) -> None:
        """Take a stored node out of its tier, the tree (merging its chain) and the retrieval index."""
        self._tiers.remove(node)
        self._forget(node)

    def _forget(self, node: Node) -> None:
        """Take a node that left the tiers out of the tree (merging its chain) and the retrieval index."""
        self._tree.remove(node)
        self._index.remove(node)

    def _drop_other_weights(self, fingerprint: str) -> None:
        """Drop every entry made under other weights than `fingerprint` (the engine's now): it can never be served.
        Children before their parents, so that no chain is merged (an edit script computed) for a node that leaves
        next."""
        if fingerprint == self._weights:
            return
        stale = [n for n in self._tree.nodes() if n.entry.fingerprint != fingerprint]
        for node in sorted(stale, key=lambda n: -len(self._tree.chain(n.id))):
            self._drop(node)
        self._weights = fingerprint

    def _enforce_budgets(self) -> None:
        offloaded: List[Node] = []
        dropped: List[Node] = []
        try:
            self._tiers.enforce(offloaded, dropped)
        finally:  # what moved before a failed copy to the CPU tier stays moved: the index must say so
            self.offloads += len(offloaded)
            for node in dropped:
                self._forget(node)
                self.evictions += 1

    # ---- inspection and maintenance ----------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._tree)

    def __contains__(self, entry_id: str) -> bool:
        if not isinstance(entry_id, str):
            return False
        with self._lock:
            return entry_id in self._tree

    @property
    def nbytes(self) -> int:
        """K/V bytes held in both tiers."""
        with self._lock:
            return self._tiers.nbytes()

    @property
    def device_nbytes(self) -> int:
        with self._lock:
            return self._tiers.nbytes("device")

    @property
    def offloaded_nbytes(self) -> int:
        with self._lock:
            return self._tiers.nbytes("offload")

    def entries(self) -> List[StoredEntry]:
        """Snapshots of every entry, least recently used first (device tier, then CPU tier)."""
        with self._lock:
            return [node.snapshot() for node in self._tiers.nodes()]

    def get(self, entry_id: str) -> StoredEntry:
        check_entry_id(entry_id)
        with self._lock:
            return self._tree.node(entry_id).snapshot()

    def remove(self, entry_id: str) -> None:
        """Drop an entry; its children are re-parented to its parent (edit scripts recomputed)."""
        check_entry_id(entry_id)
        with self._lock:
            self._drop(self._tree.node(entry_id))

    def chain(self, entry_id: str) -> List[str]:
        """Ids on the tree path root -> `entry_id`."""
        check_entry_id(entry_id)
        with self._lock:
            return self._tree.chain(entry_id)

    def verify(self) -> List[str]:
        """Ids of the entries whose tensors no longer hash to their recorded checksum: the one taken when they were
        stored (checksums=True), the one `save` wrote, or the one `load` read from the index (so a store loaded
        with verify=False finds here what the load skipped). Entries with none (stored with checksums=False and
        never saved since) are not checked."""
        with self._lock:
            nodes = [(n.id, n.entry, n.checksum) for n in self._tree.nodes()]
        return [i for i, entry, checksum in nodes if checksum is not None and entry_checksum(entry) != checksum]

    def config(self) -> Dict:
        return {"capacity_bytes": self.capacity_bytes, "candidates": self.candidates, "embedding": self.embedding,
                "max_depth": self.max_depth, "offload_bytes": self.offload_bytes,
                "min_reuse_tokens": self.min_reuse_tokens, "checksums": self.checksums}

    def __repr__(self) -> str:
        return (f"KVStore({len(self)} entries, {self.device_nbytes} / {self.capacity_bytes} device bytes, "
                f"{self.offloaded_nbytes} / {self.offload_bytes} offloaded, embedding={self.embedding!r})")

    # ---- persistence (the format and its guarantees: persistence.py) -----------------------------------------

    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Save the store into `directory` (created if missing) as a new generation, committed by one atomic rename
        of `index.json`: a crash or an error at any point leaves the previous generation or this one, whole.

        Safe from many threads and stores at once (the last save to commit wins). RuntimeError, with nothing
        written, when an entry no longer matches the checksum taken when it was stored.
        """
        directory = check_directory(directory)
        with self._engine_lock:
            fingerprint = self.engine.fingerprint

        def take_snapshot() -> persistence.Snapshot:
            with self._lock:
                self._drop_other_weights(fingerprint)  # the index vouches for one fingerprint: every entry's
                counters = persistence.Counters(self._clock, self.evictions, self.offloads)
                return persistence.snapshot(self.engine, fingerprint, self.config(), counters, self._tiers.nodes(),
                                            sentence_keys=self.embedding == "minilm")

        with self._save_lock:
            checksums = persistence.write(directory, take_snapshot)
        with self._lock:  # what was written is what is held: its checksums make verify() cover every entry
            for entry_id, checksum in checksums.items():
                node = self._tree.get(entry_id)
                if node is not None and node.checksum is None:
                    node.checksum = checksum

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], engine: ReuseEngine, *, verify: bool = True,
             **overrides) -> "KVStore":
        """Restore a store written by `save` for `engine`'s model, checked whole (persistence.py: what is checked);
        ValueError naming the file and the field for anything malformed.

        `verify=False` skips only comparing each entry's tensors with its saved checksum (faster for a large store;
        `verify()` can do it later). `overrides` replace saved settings (a smaller capacity evicts the least
        recently used entries).
        """
        directory = check_directory(directory)
        if not isinstance(engine, ReuseEngine):
            raise TypeError(f"engine: expected a ReuseEngine, got {type(engine).__name__}")
        check_bool("verify", verify)
        unknown = [name for name in overrides if name not in SETTINGS]
        if unknown:
            raise TypeError(f"{unknown[0]}: not a KVStore setting (expected one of {', '.join(SETTINGS)})")
        saved = persistence.SavedStore(directory, engine)
        store = cls(engine, **{**saved.config, **overrides})
        rehash = not saved.codes_match
        # Codes rebuilt below get a new checksum: the saved one is checked first, so that the new one vouches for
        # tensors that were as saved.
        counters, nodes = saved.restore(sentence_keys=store.embedding == "minilm", verify=verify or rehash)
        key_size = store._keys.sentence_size
        with store._lock:
            store._clock, store.evictions, store.offloads = counters.clock, counters.evictions, counters.offloads
            store._weights = nodes[0].entry.fingerprint if nodes else None  # each restored as the engine's
        for node in nodes:
            if rehash:  # the engine hashes tokens with other planes: rehash them
                with store._engine_lock, torch.inference_mode():
                    ids = node.entry.token_ids.to(engine.device)
                    node.entry = dataclasses.replace(node.entry, codes=engine.token_codes(engine.embed(ids)).cpu(),
                                                     codes_lsh=engine.codes_lsh)
                node.checksum = entry_checksum(node.entry)
            if node.key is not None and key_size is not None and node.key.numel() != key_size:
                raise ValueError(f"load: {saved.tensor_path}: {node.id}.{persistence.KEY_FIELD}: {node.key.numel()} "
                                 f"dimensions, the sentence embedder makes {key_size}")
            if node.key is None:
                node.key = store._keys.key_of(node.entry.token_ids.tolist(), node.entry.embedding)
            with store._lock:
                store._add(node)
        with store._lock:
            store._tree.link_children()
            store._enforce_budgets()
            # The K/V were read into CPU memory; only what the device tier keeps under its budget goes to the
            # device, so a store loaded with a smaller capacity than it was saved with evicts before it allocates
            # (moving every saved device entry first could exhaust the device that the smaller capacity fits).
            for node in store._tiers.nodes():
                if node.tier == "device":
                    node.entry = dataclasses.replace(node.entry, keys=node.entry.keys.to(engine.device),
                                                     values=node.entry.values.to(engine.device))
        return store
