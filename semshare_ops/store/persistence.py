"""A store on disk: `entries.safetensors` and `index.json` in one directory.

`entries.safetensors` holds every entry's token_ids, keys, values, codes and embedding, named `<id>.<field>` (and
`<id>.sentence_embedding`, the retrieval key, for a store with embedding="minilm": it costs a MiniLM forward to
recompute, where the model-embedding key is recomputed from the saved embedding in no time). `index.json` holds the
format name and version, the engine fingerprint, the store config, its counters and per-entry metadata (tenant,
shared flag, parent, edit script, depth, tier, recency stamp) in LRU order, device tier first, so that restoring in
file order rebuilds both LRU orders. JSON for the metadata: small, and readable by anyone inspecting a store.

Checks at load, each a ValueError (FileNotFoundError for a missing file): the index must name this format and
version, and the fingerprint (model and tokenizer) must be the engine's: K/V of another model, or token ids of another
tokenizer, would be served as if they were this engine's. The tensor file is looked up inside the directory only,
whatever the index names. Token codes saved under other LSH settings (bits, seed, rope base) are recomputed by the
store, not refused: they are a function of the token ids and the engine.

Each file is written under a temporary name, then renamed over the old one, so neither is ever left half-written
(the two renames are two steps, not one).

Saving is split in two: `snapshot` (metadata and references, cheap) runs under the store's index lock, `write` (the
copies to CPU and the file writes) outside it, so a save does not stall requests.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..engine.engine import ReferenceEntry, ReuseEngine
from .entries import Node

FORMAT = "semshare_ops.KVStore"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TENSOR_FILE = "entries.safetensors"
FIELDS = ("token_ids", "keys", "values", "codes", "embedding")  # the tensors of a ReferenceEntry, saved per entry

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Counters:
    """The store's counters, saved so that a loaded store goes on with fresh ids and the same recency clock."""

    next_id: int
    clock: int
    evictions: int
    offloads: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What `write` puts on disk: the index (plain data) and, per entry, its tensors and sentence key."""

    index: Dict
    fingerprint: str
    entries: List[Tuple[str, ReferenceEntry, Optional[torch.Tensor]]]


def engine_lsh(engine: ReuseEngine) -> Dict:
    """The engine settings its token codes depend on."""
    cfg = engine.config
    return {"lsh_bits": cfg.lsh_bits, "lsh_seed": cfg.lsh_seed, "embedding_rope_base": cfg.embedding_rope_base}


def snapshot(engine: ReuseEngine, config: Dict, counters: Counters, nodes: Iterable[Node],
             sentence_keys: bool) -> Snapshot:
    """Metadata and tensor references of `nodes` (in LRU order, device tier first); run it under the index lock."""
    nodes = list(nodes)
    meta = [{"id": n.id, "tenant": n.tenant, "shared": n.shared, "parent": n.parent, "depth": n.depth,
             "edits": n.edits, "opcodes": None if n.opcodes is None else [list(op) for op in n.opcodes],
             "tier": n.tier, "stamp": n.stamp, "nbytes": n.entry.nbytes} for n in nodes]
    index = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": engine.fingerprint, "config": config,
             "engine_lsh": engine_lsh(engine), "next_id": counters.next_id, "clock": counters.clock,
             "evictions": counters.evictions, "offloads": counters.offloads, "tensors": TENSOR_FILE, "entries": meta}
    entries = [(n.id, n.entry, n.key if sentence_keys else None) for n in nodes]
    return Snapshot(index, engine.fingerprint, entries)


def write(directory: PathLike, snap: Snapshot) -> None:
    """Write `entries.safetensors` and `index.json` into `directory` (created if missing)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for entry_id, entry, key in snap.entries:
        for name in FIELDS:
            tensors[f"{entry_id}.{name}"] = _owned(getattr(entry, name))
        if key is not None:
            tensors[f"{entry_id}.sentence_embedding"] = _owned(key)
    tmp_tensors, tmp_index = directory / (TENSOR_FILE + ".tmp"), directory / (INDEX_FILE + ".tmp")
    save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                                                    "fingerprint": snap.fingerprint})
    tmp_index.write_text(json.dumps(snap.index, indent=1))
    os.replace(tmp_tensors, directory / TENSOR_FILE)
    os.replace(tmp_index, directory / INDEX_FILE)


class SavedStore:
    """A saved store, read and checked against `engine` (format, version, fingerprint, tensor file).

    `config` is the saved store config; `codes_match` says whether the saved token codes are the engine's;
    `restore` builds the entries.
    """

    def __init__(self, directory: PathLike, engine: ReuseEngine):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        self.index_path = index_path = directory / INDEX_FILE
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
        self.tensor_path = tensor_path = directory / Path(str(index.get("tensors", TENSOR_FILE))).name
        if not tensor_path.is_file():
            raise FileNotFoundError(f"load: tensor file {tensor_path} is missing")
        try:
            self.tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"load: tensor file {tensor_path} is corrupt or unreadable ({err})") from None
        self.index, self.engine = index, engine

    @property
    def config(self) -> Dict:
        return self.index["config"]

    @property
    def codes_match(self) -> bool:
        """Whether the saved token codes were made with the engine's LSH settings (else the store rehashes)."""
        return self.index.get("engine_lsh") == engine_lsh(self.engine)

    def restore(self, sentence_keys: bool) -> Tuple[Counters, List[Node]]:
        """The saved counters and entries, in file order (LRU, device tier first).

        Each node's K/V are on the engine's device (device tier) or on CPU (offload tier); its `key` is the saved
        sentence embedding when `sentence_keys` and the file has one, else None (the store computes it); its
        children are not filled in; `checksum` is None.
        """
        index, tensors, tensor_path = self.index, self.tensors, self.tensor_path
        device = self.engine.device
        try:
            counters = Counters(int(index["next_id"]), int(index["clock"]), int(index.get("evictions", 0)),
                                int(index.get("offloads", 0)))
            nodes = []
            for meta in index["entries"]:
                entry_id = meta["id"]
                fields = {}
                for name in FIELDS:
                    if f"{entry_id}.{name}" not in tensors:
                        raise ValueError(f"load: tensor {entry_id}.{name} is missing from {tensor_path}")
                    fields[name] = tensors[f"{entry_id}.{name}"]
                on = device if meta["tier"] == "device" else torch.device("cpu")
                fields["keys"], fields["values"] = fields["keys"].to(on), fields["values"].to(on)
                entry = ReferenceEntry(fingerprint=self.engine.fingerprint, **fields)
                key = tensors.get(f"{entry_id}.sentence_embedding") if sentence_keys else None
                opcodes = None if meta["opcodes"] is None else tuple(tuple(op) for op in meta["opcodes"])
                nodes.append(Node(entry_id, entry, meta["tenant"], bool(meta["shared"]), key, meta["parent"],
                                  int(meta["depth"]), meta["edits"], opcodes, meta["tier"], int(meta["stamp"])))
        except (KeyError, TypeError) as err:
            raise ValueError(f"load: {self.index_path} is missing or has malformed entry metadata ({err!r})") from None
        ids = {node.id for node in nodes}
        for node in nodes:
            if node.parent is not None and node.parent not in ids:
                raise ValueError(f"load: entry {node.id} names a parent {node.parent} that is not stored")
        return counters, nodes


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses views sharing one)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t
