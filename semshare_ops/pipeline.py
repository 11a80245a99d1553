"""The reuse pipeline of SPEC.md section 4 on Hugging Face causal LMs (Llama, Qwen2, Mistral and alike).

    engine = ReuseEngine(model, tokenizer, ReuseConfig())
    ref = engine.prefill(reference_prompt)                      # immutable ReferenceEntry
    out = engine.generate(target_prompt, reference=ref)         # match, assemble, recompute, decode
    full = engine.generate(target_prompt)                       # full prefill, same decode path

How a reuse request runs (target of T tokens):
1. Match target tokens to reference tokens (matching.py).
2. Assemble the target cache for positions 0..T-2 with one `rope_reuse_` over all layers.
3. Recompute layer by layer through the model's own decoder layers, for a shrinking, nested set of positions:
   every position in the first `check_layers` layers; past them the unmatched tokens plus the matched tokens whose
   K/V deviate most (||dK|| + ||dV|| between reused and fresh K/V at the last check layer), their number decaying by
   `recompute_decay` per layer and scaled so that the average over layers meets `recompute_ratio`.
4. Optionally keep fewer KV entries in deeper layers (`retain_ratio`), by the attention the last prompt tokens pay.
5. Decode with HF `generate`: it runs the last prompt token through every layer, then the new tokens.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from transformers.generation.streamers import BaseStreamer

from . import matching, ops
from .hf import SemShareCache, use_semshare_attention

Prompt = Union[str, Sequence[int]]


MATCHING_METHODS = ("edit", "lsh", "hybrid", "prefix", "chunk")


@dataclass
class ReuseConfig:
    """Knobs of the reuse path. Defaults are our own choices where the papers leave them open (see README)."""

    matching: str = "hybrid"  # "edit" | "lsh" | "hybrid"; baselines: "prefix" | "chunk" (see matching.py)
    recompute_ratio: float = 0.2  # share of prompt tokens recomputed, averaged over layers (mandatory ones count)
    retain_ratio: Optional[float] = None  # KV kept, averaged over layers; None keeps everything
    min_similarity: float = 0.5  # share of target tokens matched below which a request takes a full prefill
    rope_correction: bool = True  # re-rotate reused keys by the position delta
    check_layers: int = 2  # leading layers recomputed in full; deviation is measured at the last of them
    # Per-layer factor of the recompute count past the check layers. 0.95, not 0.9: bench/ablate_reuse.py found 0.9
    # left deep layers too few recomputed tokens for near-duplicates, whose differences are scattered.
    recompute_decay: float = 0.95
    recompute_tail: int = 0  # last prompt tokens recomputed in every layer (the question, the chat template's end)
    retain_decay: float = 0.9  # per-layer factor of the KV kept, when retain_ratio is set
    lsh_bits: int = 128
    lsh_max_distance: int = 24  # fuzzy matches farther than this many bits stay unmatched
    lsh_seed: int = 0
    embedding_rope_base: float = 10000.0

    def __post_init__(self):
        if self.matching not in MATCHING_METHODS:
            raise ValueError(f"matching: expected one of {', '.join(map(repr, MATCHING_METHODS))}, "
                             f"got {self.matching!r}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio: expected a value in [0, 1], got {self.recompute_ratio}")
        if self.retain_ratio is not None and not 0.0 < self.retain_ratio <= 1.0:
            raise ValueError(f"retain_ratio: expected None or a value in (0, 1], got {self.retain_ratio}")
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity: expected a value in [0, 1], got {self.min_similarity}")
        if self.recompute_tail < 0:
            raise ValueError(f"recompute_tail: expected >= 0, got {self.recompute_tail}")
        if self.check_layers < 1:
            raise ValueError(f"check_layers: expected >= 1, got {self.check_layers}")
        for name in ("recompute_decay", "retain_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class ReferenceEntry:
    """A prefilled prompt: token ids, per-layer K/V ([L, T, H, D], post-RoPE), LSH codes, prompt embedding.

    Serving requests from it only reads these tensors.
    """

    token_ids: torch.Tensor  # int64 [T]
    keys: torch.Tensor  # [L, T, Hkv, D]
    values: torch.Tensor  # [L, T, Hkv, Dv]
    codes: torch.Tensor  # int64 [T, W]: simhash of position-rotated input embeddings
    embedding: torch.Tensor  # fp32 [hidden]: mean input embedding of the prompt
    fingerprint: str  # model and tokenizer this entry belongs to

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()


@dataclass
class GenerationOutput:
    text: str
    token_ids: List[int]
    stats: Dict = field(default_factory=dict)
    logits: Optional[tuple] = None  # per new token [1, vocab], when generate is asked for output_logits=True
    entry: Optional[ReferenceEntry] = None  # this request's prompt K/V, when generate(return_entry=True)


class _FirstTokenTimer(BaseStreamer):
    """Notes when generate emits its first new token (its first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.calls, self.first_token_s = start, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start


def decaying_counts(total: int, layers: int, lead: int, floor: int, target_mean: float, decay: float) -> List[int]:
    """Per-layer counts: `total` for the first `lead` layers, then base * decay^i clamped to [floor, total],
    with base chosen (by bisection) so that the mean over all layers is as close to `target_mean` as allowed."""
    lead = min(lead, layers)

    def counts(base: float) -> List[int]:
        tail = [min(total, max(floor, round(base * decay**i))) for i in range(layers - lead)]
        return [total] * lead + tail

    lo, hi = 0.0, total / decay ** max(layers, 1) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(counts(mid)) / layers < target_mean:
            lo = mid
        else:
            hi = mid
    return counts(hi)


class ReuseEngine:
    """Serves prompts with KV reuse from reference entries, on one HF causal LM (batch size 1)."""

    def __init__(self, model, tokenizer, config: Optional[ReuseConfig] = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or ReuseConfig()
        use_semshare_attention(model)
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.decoder = model.model
        self.inv_freq = self.decoder.rotary_emb.inv_freq.float()
        self.planes = matching.lsh_planes(cfg.hidden_size, self.config.lsh_bits, self.config.lsh_seed)
        self.fingerprint = self._fingerprint()

    # ---- public API ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompt: Prompt) -> ReferenceEntry:
        """Prefill a prompt once and keep what reuse needs."""
        ids = self._token_ids(prompt, max_new_tokens=0)
        cache = self._new_cache(capacity=len(ids))
        with cache.active():
            self.model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return self._entry(ids, cache.keys, cache.values)  # [L, T, H, D]: the layers are views of these

    @contextlib.contextmanager
    def using(self, config: Optional[ReuseConfig]) -> Iterator["ReuseEngine"]:
        """Serve with `config` inside the block (None: keep the current one); the old config comes back after.

        Not thread-safe on its own: callers that share an engine across threads hold their own lock around it.
        """
        previous = self.config
        if config is not None:
            self.config = config
        try:
            yield self
        finally:
            self.config = previous

    @torch.inference_mode()
    def match(self, reference: ReferenceEntry, prompt: Prompt) -> matching.Match:
        """The token pairs a reuse request for `prompt` would take from `reference` (no model call)."""
        self._check_reference(reference)
        return self._match(reference, self._token_ids(prompt, 0))

    @torch.inference_mode()
    def generate(self, prompt: Prompt, reference: Optional[ReferenceEntry] = None, max_new_tokens: int = 64,
                 return_entry: bool = False, **generate_kwargs) -> GenerationOutput:
        """Generate from `prompt`, reusing `reference`'s KV when given and similar enough; else full prefill.

        return_entry=True also hands back this request's prompt K/V as a ReferenceEntry (`out.entry`), copied
        out of the cache after decoding, so that a store can serve later requests from it. It needs every
        layer to hold every prompt position (no retain_ratio).
        """
        start = time.perf_counter()
        if return_entry and self.config.retain_ratio is not None:
            raise ValueError("return_entry: a request served with retain_ratio keeps a partial cache; "
                             "an entry needs every prompt position in every layer")
        ids = self._token_ids(prompt, max_new_tokens)
        stats = {"mode": "full", "prompt_tokens": len(ids), "matched_tokens": 0,
                 "recomputed_tokens": [len(ids)] * self.num_layers, "similarity": None}
        cache, kv_bytes = None, None
        if reference is not None:
            self._check_reference(reference)
            match = self._match(reference, ids)
            stats["matched_tokens"] = match.matched
            stats["similarity"] = match.matched / len(ids)
            if stats["similarity"] < self.config.min_similarity:
                stats["mode"] = "fallback"
            else:
                stats["mode"] = "reuse"
                cache = self._new_cache(capacity=len(ids) + max_new_tokens, used=len(ids) - 1)
                stats["recomputed_tokens"] = self._assemble_and_recompute(cache, reference, ids, match)
                kv_bytes = cache.nbytes() + self.num_layers * self._token_bytes  # + the last prompt token
        if cache is None:
            cache = self._new_cache(capacity=len(ids) + max_new_tokens)
        new_ids, ttft_s, logits = self._decode(ids, cache, max_new_tokens, start, generate_kwargs)
        kv_full = self.num_layers * len(ids) * self._token_bytes
        stats.update(reuse_ratio=1.0 - sum(stats["recomputed_tokens"]) / (self.num_layers * len(ids)),
                     kv_bytes=kv_full if kv_bytes is None else kv_bytes, kv_bytes_full=kv_full,
                     ttft_ms=ttft_s * 1e3)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        entry = self._entry_from_cache(ids, cache) if return_entry else None
        return GenerationOutput(text, new_ids, stats, logits, entry)

    # ---- steps -----------------------------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def _token_bytes(self) -> int:
        """K/V bytes of one token in one layer."""
        return self.kv_heads * 2 * self.head_dim * self._dtype.itemsize

    @property
    def _device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def _fingerprint(self) -> str:
        cfg = self.model.config.to_dict()
        cfg.pop("_name_or_path", None)
        probe = self.tokenizer("semshare fingerprint: 0123456789 Hello, world!")["input_ids"]
        weights = self.decoder.embed_tokens.weight[:8, :16].detach().float().cpu().numpy().tobytes()
        blob = json.dumps([cfg, type(self.tokenizer).__name__, len(self.tokenizer), probe], sort_keys=True,
                          default=str)
        return hashlib.sha1(blob.encode() + weights).hexdigest()

    def _check_reference(self, reference: ReferenceEntry) -> None:
        if not isinstance(reference, ReferenceEntry):
            raise TypeError(f"reference: expected a ReferenceEntry, got {type(reference).__name__}")
        if reference.fingerprint != self.fingerprint:
            raise ValueError("reference: it was made by another model or tokenizer than this engine's")

    def _entry_from_cache(self, ids: torch.Tensor, cache: SemShareCache) -> ReferenceEntry:
        """Prompt positions 0..T-1 of every layer, copied out (the cache also holds the new tokens)."""
        n = len(ids)
        for layer in cache.layers:  # slot == position holds while no layer was compacted
            torch._check(layer.used >= n and bool((layer.kv_pos[:n] == torch.arange(n, device=ids.device)).all()),
                         lambda: "semshare cache: prompt slots are not in position order")
        return self._entry(ids, torch.stack([layer.keys[:n] for layer in cache.layers]),
                           torch.stack([layer.values[:n] for layer in cache.layers]))

    def _entry(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> ReferenceEntry:
        embeddings = self._embed(ids)
        return ReferenceEntry(ids.cpu(), keys, values, self._codes(embeddings).cpu(),
                              embeddings.float().mean(0).cpu(), self.fingerprint)

    def _token_ids(self, prompt: Prompt, max_new_tokens: int) -> torch.Tensor:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"prompt: token ids must lie in [0, {vocab})")
        if len(ids) == 0:
            raise ValueError("prompt: empty prompt (no tokens)")
        if self.max_positions and len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt: {len(ids)} tokens + {max_new_tokens} new exceed the model's context of "
                             f"{self.max_positions}")
        return torch.tensor(ids, dtype=torch.long, device=self._device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def _codes(self, embeddings: torch.Tensor) -> torch.Tensor:
        return matching.embedding_codes(embeddings, self.planes, self.config.embedding_rope_base)

    def _new_cache(self, capacity: int, used: int = 0) -> SemShareCache:
        return SemShareCache.allocate(self.num_layers, capacity, self.kv_heads, self.head_dim, self.head_dim,
                                      self._dtype, self._device, used)

    def _match(self, reference: ReferenceEntry, ids: torch.Tensor) -> matching.Match:
        codes = None
        if self.config.matching != "edit":
            codes = self._codes(self._embed(ids)).cpu()
        return matching.match_tokens(reference.token_ids, ids.cpu(), self.config.matching, reference.codes, codes,
                                     self.config.lsh_max_distance)

    def _assemble_and_recompute(self, cache: SemShareCache, reference: ReferenceEntry, ids: torch.Tensor,
                                match: matching.Match) -> List[int]:
        """Steps 2-4 for prompt positions 0..T-2; returns the recomputed tokens per layer (last token included)."""
        cfg, prefill = self.config, len(ids) - 1
        keep = match.dst < prefill
        dst, src = match.dst[keep].to(self._device), match.src[keep].to(self._device)
        delta = dst - src if cfg.rope_correction else torch.zeros_like(dst)
        ops.rope_reuse_(cache.keys, cache.values, reference.keys.to(self._device), reference.values.to(self._device),
                        src, dst, delta, self.inv_freq.to(self._device), True)
        window = min(_OBSERVER_WINDOW, prefill) if cfg.retain_ratio is not None else 0
        unmatched = match.unmatched_mask()[:prefill].to(self._device)
        unmatched[prefill - window:] = True  # the observer window of retention is always recomputed
        unmatched[max(0, prefill - cfg.recompute_tail):] = True
        with cache.active():
            counts = self._recompute(cache, ids[:prefill], unmatched, window)
        if cfg.retain_ratio is not None:
            self._retain(cache, prefill, window)
        return [c + 1 for c in counts]

    def _recompute(self, cache: SemShareCache, ids: torch.Tensor, unmatched: torch.Tensor, window: int) -> List[int]:
        """Run the decoder layers on a nested, shrinking set of positions; K/V go into the cache as they come."""
        cfg, prefill, num_layers = self.config, len(ids), self.num_layers
        if prefill == 0:
            return [0] * num_layers
        # Average over layers of (count + 1 for the last token) should be recompute_ratio * (prefill + 1).
        target = max(0.0, cfg.recompute_ratio * (prefill + 1) - 1)
        # A prefix-cache hit holds exactly the K/V a full prefill would: no layer needs checking.
        lead = 0 if cfg.matching == "prefix" else cfg.check_layers
        counts = decaying_counts(prefill, num_layers, lead, int(unmatched.sum()), target, cfg.recompute_decay)
        check = min(lead, num_layers) - 1
        rows = torch.arange(prefill, device=self._device)
        order = torch.argsort((~unmatched).to(torch.int8), stable=True)  # unmatched first until ranked
        if counts[0] < prefill:
            rows = order[: counts[0]].sort().values
        hidden = self._embed(ids[rows])[None]
        cache.observe = window
        for idx, layer in enumerate(self.decoder.layers):
            if len(rows) == 0:  # nested sets: every deeper layer reuses everything too
                break
            snapshot = None
            if idx == check and min(counts) < prefill:  # deviation ranking is needed only if some layer skips
                snapshot = (cache.layers[idx].keys[:prefill].clone(), cache.layers[idx].values[:prefill].clone())
            cache.set_write_positions(idx, rows)
            position_ids = rows[None]
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids, past_key_values=cache,
                           use_cache=True, position_embeddings=self.decoder.rotary_emb(hidden, position_ids))
            cache.set_write_positions(idx, None)
            if snapshot is not None:
                order = self._priority(cache.layers[idx], snapshot, unmatched)
            if idx + 1 < num_layers and counts[idx + 1] < len(rows):
                chosen = order[: counts[idx + 1]].sort().values  # a prefix of one order: sets stay nested
                hidden = hidden[:, torch.searchsorted(rows, chosen)]
                rows = chosen
        cache.observe = 0
        return counts

    @staticmethod
    def _priority(layer, snapshot, unmatched: torch.Tensor) -> torch.Tensor:
        """Positions to recompute first: unmatched ones, then matched ones by ||dK|| + ||dV|| (reused vs fresh)."""
        prefill = len(unmatched)
        old_k, old_v = snapshot
        deviation = ((layer.keys[:prefill] - old_k).float().flatten(1).norm(dim=1)
                     + (layer.values[:prefill] - old_v).float().flatten(1).norm(dim=1))
        deviation = deviation.masked_fill(unmatched, math.inf)
        return torch.argsort(deviation, descending=True, stable=True)

    def _retain(self, cache: SemShareCache, prefill: int, window: int) -> None:
        """Keep fewer KV entries in deeper layers: the most attended-to by the observer window, plus the first
        tokens (attention sinks) and the window itself; the rest are dropped and the layer compacted."""
        cfg = self.config
        floor = min(prefill, window + _SINK_TOKENS)
        counts = decaying_counts(prefill, self.num_layers, cfg.check_layers, floor, cfg.retain_ratio * prefill,
                                 cfg.retain_decay)
        for layer, count in zip(cache.layers, counts):
            if count >= prefill or layer.scores is None:
                continue
            scores = layer.scores[:prefill].clone()
            scores[:_SINK_TOKENS] = math.inf
            scores[prefill - window:] = math.inf
            kept = torch.topk(scores, count).indices.sort().values
            layer.keep(kept)

    def _decode(self, ids: torch.Tensor, cache: SemShareCache, max_new_tokens: int, start: float,
                generate_kwargs: Dict):
        timer = _FirstTokenTimer(start)
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "streamer": timer,
                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **generate_kwargs}
        with cache.active():
            out = self.model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                      past_key_values=cache, **kwargs)
        logits = getattr(out, "logits", None)  # a GenerateOutput when return_dict_in_generate=True
        sequences = getattr(out, "sequences", out)
        return sequences[0, len(ids):].tolist(), timer.first_token_s, logits


_OBSERVER_WINDOW = 16  # last prompt tokens whose attention ranks KV entries for retention (SnapKV-style)
_SINK_TOKENS = 4  # first tokens always kept: models park attention there
