"""The reuse pipeline of docs/contract.md section 4 on Hugging Face causal LMs (RoPE decoders; docs/models.md).

    engine = ReuseEngine(model, tokenizer, ReuseConfig())
    ref = engine.prefill(reference_prompt)                      # immutable ReferenceEntry
    out = engine.generate(target_prompt, reference=ref)         # match, assemble, recompute, decode
    full = engine.generate(target_prompt)                       # full prefill, same decode path

How a reuse request runs (target of T tokens):
1. Match target tokens to reference tokens (matching.py).
2. Assemble the target cache for positions 0..T-2 with `rope_reuse_`, one call per group of layers that share a
   rotary embedding (architecture.py: how the engine learns each layer's, and which models it refuses).
3. Recompute layer by layer through the model's own decoder layers, for a shrinking, nested set of positions past
   the exact common prefix (recomputed in no layer; rows.py chooses the sets): every one in the first `check_layers`
   layers; past them the unmatched tokens, then the `recompute_boundary` tokens after each break, then the matched
   tokens whose K/V deviate most (||dK|| + ||dV|| between reused and fresh K/V at the last check layer), their
   number decaying by `recompute_decay` per layer (1.0: the same in every layer) and scaled so that the average
   over layers meets `recompute_ratio` (of the matched tokens, the unmatched on top, with the default
   `budget="adaptive"`).
4. Optionally keep fewer KV entries in deeper layers (`retain_ratio`), by the attention the last prompt tokens pay.
5. Decode with HF `generate`: it runs the last prompt token through every layer, then the new tokens. With
   `guard_margin` set, a step from a stale reused cache whose best token barely leads is not taken from it: the
   prompt and the tokens so far are prefilled in full and decoding goes on exact (`stats["guard"]`). With
   `decode_recompute` set, the rows step 3 left reused in some layer are recomputed a few per step between decode
   steps, in position order (`stats["decode_recomputed_tokens"]`).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import numbers
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import ops
from ..ops import oracle
from . import matching
from .config import ReuseConfig
from .architecture import Architecture, RopeGroup, UnsupportedModelError, declared_windows, refusal
from .hf import KVWritten, SemShareCache, previous_implementation, use_semshare_attention, watching_mask_windows
from .rows import (QUERY_SELECTIONS, RowPlan, RowSchedule, decaying_counts, effective_check_layers, exact_prefix,
                   kept_exact_prefix, recompute_rows)

Prompt = Union[str, Sequence[int]]


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
    # Leading positions whose K/V are exactly a full prefill's: every position for a prefill, the exact common
    # prefix with its own reference for a reused prompt (every position when no row was left reused in any layer:
    # an extension of its reference, ratio 1.0). Only they may serve a later prompt without recompute.
    exact_prefix: int = 0
    # The LSH settings `codes` were made with (ReuseConfig's lsh_bits, lsh_seed, embedding_rope_base), which the
    # fingerprint leaves out; an engine hashing with others refuses the entry. None: not recorded (not checked).
    codes_lsh: Optional[Tuple[int, int, float]] = None

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
    """Notes when generate emits its first new token (its first `put` is the prompt), and passes every put on to the
    caller's own streamer, if any. After a guard repair (`restart`) the repair's prompt put is not passed on again:
    the caller's streamer has seen the prompt and the tokens it holds."""

    def __init__(self, start: float, forward: Optional[BaseStreamer] = None):
        self.start, self.calls, self.first_token_s, self.forward = start, 0, None, forward
        self.skip_prompt = False

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        if self.forward is not None and not (self.skip_prompt and self.calls == 1):
            self.forward.put(value)

    def restart(self) -> None:
        self.calls, self.skip_prompt = 0, True

    def end(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        if self.forward is not None:
            self.forward.end()


class _GuardTripped(Exception):
    """A decode step from a reused cache led by less than the guard's margin, before its token was emitted."""

    def __init__(self, generated: List[int], lead: float):
        super().__init__(f"guard tripped after {len(generated)} tokens (lead {lead:.3f})")
        self.generated, self.lead = generated, lead


def logit_leads(logits: torch.Tensor) -> torch.Tensor:
    """[..., vocab] -> [...]: how far each row's best logit leads the second, the quantity `guard_margin` bounds."""
    top = logits.float().topk(2, -1).values
    return top[..., 0] - top[..., 1]


class _MarginGuard(LogitsProcessor):
    """ReuseConfig.guard_margin: the lead of each step's best token over the second in the model's logits (first
    of the caller's processors; after those the model's generation config adds, which greedy decoding has none of
    by default). A lead under the margin raises _GuardTripped before the token is chosen, so nothing from that
    step is emitted or streamed. Keeps the steps' logits when the caller asked for them (a repair loses the first
    run's own record)."""

    def __init__(self, margin: float, prompt_tokens: int, keep_scores: bool):
        self.margin, self.prompt_tokens, self.keep_scores = margin, prompt_tokens, keep_scores
        self.lowest, self.scores = math.inf, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        lead = float(logit_leads(scores[0]))
        if lead < self.margin:
            raise _GuardTripped(input_ids[0, self.prompt_tokens:].tolist(), lead)
        self.lowest = min(self.lowest, lead)
        if self.keep_scores:
            self.scores.append(scores)
        return scores


class _DecodeRecompute(StoppingCriteria):
    """ReuseConfig.decode_recompute: between decode steps, the next `rows` stale prompt positions (`cache.stale`, in
    position order) run through every layer (ReuseEngine._recompute_stale). Called once per step of at most `steps`,
    after that step's forward (generate: as a stopping criterion, once the step's token is chosen and streamed, so
    that it knows the token): the first call (the first token's) does nothing, so the first token is not delayed,
    and neither does the last, whose rows no later step would read: the `steps`-th, or the one whose token is one of
    `stop_ids` (an end of sequence, where generate stops). Never stops generation itself."""

    def __init__(self, engine: "ReuseEngine", ids: torch.Tensor, cache: SemShareCache, rows: int, steps: int,
                 stop_ids: frozenset = frozenset()):
        self.engine, self.ids, self.cache, self.rows, self.steps = engine, ids, cache, rows, steps
        self.stop_ids, self.calls, self.done = stop_ids, 0, 0

    def step(self, last: bool = False) -> None:
        stale = self.cache.stale
        if 0 < self.calls < self.steps - 1 and not last and self.done < len(stale):
            positions = stale[self.done: self.done + self.rows]
            self.engine._recompute_stale(self.cache, self.ids, positions)
            self.done += len(positions)
        self.calls += 1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.step(last=bool(self.stop_ids) and int(input_ids[0, -1]) in self.stop_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class ReuseEngine:
    """Serves prompts with KV reuse from reference entries, on one HF causal LM (batch size 1)."""

    def __init__(self, model, tokenizer, config: Optional[ReuseConfig] = None):
        """Refuses (ValueError naming the feature and the model class) a model whose KV cache it cannot reuse
        exactly; see architecture.py for what is checked, statically and by two small measured probes."""
        if config is not None and not isinstance(config, ReuseConfig):
            raise TypeError(f"config: expected a ReuseConfig or None, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a Hugging Face causal LM (a torch.nn.Module), got {type(model).__name__}")
        if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer: expected a Hugging Face tokenizer (callable, with decode), got "
                            f"{type(tokenizer).__name__}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or ReuseConfig()
        self._spare: Optional[tuple] = None  # cache storage of a finished request, for the next (_request_cache)
        self._spare_lock = threading.Lock()
        try:
            self._set_up(model)
        except UnsupportedModelError:
            raise
        except Exception as err:  # anything a new family does differently: refuse it by name, do not guess
            raise refusal(model, f"setting up reuse failed ({type(err).__name__}: {err})") from err
        self._fingerprint_of: Optional[tuple] = None  # (the weights' storages and versions, their fingerprint)
        self.fingerprint  # noqa: B018 -- taken now, not by the first request: the weights' digest is a pass over them

    @property
    def fingerprint(self) -> str:
        """What decides whether an entry is valid here (`_fingerprint`), taken again whenever a parameter or buffer
        changed since (its storage or its version counter: an in-place update, a weight swapped in), so that an
        entry made before a fine-tuning step is refused, not served with the new weights."""
        state = tuple((t.data_ptr(), t._version) for t in itertools.chain(self.model.parameters(),
                                                                            self.model.buffers()))
        known = self._fingerprint_of
        if known is None or known[0] != state:
            known = self._fingerprint_of = (state, self._fingerprint())
        return known[1]

    @property
    def codes_lsh(self) -> Tuple[int, int, float]:
        """The LSH settings this engine's token codes are made with (fixed for its life: `using`)."""
        return tuple(getattr(self.config, name) for name in LSH_SETTINGS)

    def _set_up(self, model) -> None:
        self.arch = Architecture.of(model)
        cfg = model.config
        self.decoder = model.model
        self.num_layers = len(self.decoder.layers)
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = self.arch.max_positions
        # transformers 5.24 renamed the cache argument of forward and generate (past_key_values -> cache).
        self._cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        self._layer_cache_kw = ("cache" if "cache" in inspect.signature(type(self.decoder.layers[0]).forward).parameters
                                else "past_key_values")
        use_semshare_attention(model)
        self.planes = matching.lsh_planes(cfg.hidden_size, self.config.lsh_bits, self.config.lsh_seed)
        with torch.inference_mode():
            self.rope_groups = self._probe_rope()
            self._self_check()
        self._checked_dtype = self.kv_dtype  # what the probe and the checks above measured

    # ---- public API ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompt: Prompt) -> ReferenceEntry:
        """Prefill a prompt once and keep what reuse needs."""
        ids = self.tokenize(prompt, max_new_tokens=0)
        cache = self._new_cache(capacity=len(ids))
        with cache.active():
            self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return self._entry(ids, cache.keys, cache.values, len(ids))  # [L, T, H, D]: the layers are views of these

    @contextlib.contextmanager
    def using(self, config: Optional[ReuseConfig]) -> Iterator["ReuseEngine"]:
        """Serve with `config` inside the block (None: keep the current one); the old config comes back after.

        Not thread-safe on its own: callers that share an engine across threads hold their own lock around it (with
        stores serving from the engine, `KVStore.model_lock`, which the stores hold to read the config).
        """
        previous = self.config
        if config is not None:
            if not isinstance(config, ReuseConfig):
                raise TypeError(f"config: expected a ReuseConfig or None, got {type(config).__name__}")
            for name in LSH_SETTINGS:  # the planes, and the codes of every entry made so far, depend on them
                if getattr(config, name) != getattr(previous, name):
                    raise ValueError(f"config.{name}: {getattr(config, name)!r}, but this engine hashes tokens with "
                                     f"{getattr(previous, name)!r} (fixed when it is made, like its entries' codes); "
                                     "make another engine")
            self.config = config
        try:
            yield self
        finally:
            self.config = previous

    @torch.inference_mode()
    def match(self, reference: ReferenceEntry, prompt: Prompt) -> matching.Match:
        """The token pairs a reuse request for `prompt` would take from `reference` (no model call)."""
        self._check_reference(reference)
        return self._match(reference, self.tokenize(prompt, 0))

    @torch.inference_mode()
    def generate(self, prompt: Prompt, reference: Optional[ReferenceEntry] = None, max_new_tokens: int = 64,
                 return_entry: bool = False, min_similarity: Optional[float] = None, prefix_only: bool = False,
                 **generate_kwargs) -> GenerationOutput:
        """Generate from `prompt`, reusing `reference`'s KV when given and similar enough; else full prefill.

        return_entry=True also hands back this request's prompt K/V as a ReferenceEntry (`out.entry`), copied
        out of the cache after decoding, so that a store can serve later requests from it. It needs every
        layer to hold every prompt position (no retain_ratio). min_similarity, when given, is this call's gate
        instead of the config's (read per call: the config is not changed, since other threads read it).
        prefix_only=True takes from `reference` only its exact common prefix with the prompt (the positions whose K/V
        it holds exactly as a full prefill of the prompt computes them, as a prefix cache would) and computes every
        other position in full, whatever the similarity: a full prefill's result for less work (the store's path
        for a base under the gate that shares an exact prefix). Generation is greedy, one sequence (batch size 1),
        over the engine's cache, whatever the model's generation_config says about sampling, beams or its cache;
        other `generate` keyword arguments go to HF `generate`.
        """
        start = time.perf_counter()
        check_count("max_new_tokens", max_new_tokens, minimum=1)
        check_gate(min_similarity)
        for name, flag in (("return_entry", return_entry), ("prefix_only", prefix_only)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
        check_generate_kwargs(generate_kwargs)
        gate = self.config.min_similarity if min_similarity is None else min_similarity
        if return_entry and self.config.retain_ratio is not None:
            raise ValueError("return_entry: a request served with retain_ratio keeps a partial cache; "
                             "an entry needs every prompt position in every layer")
        ids = self.tokenize(prompt, max_new_tokens)
        cache, stats, exact = self._serve_prompt(ids, reference, gate, capacity=len(ids) + max_new_tokens,
                                                 prefix_only=prefix_only)
        new_ids, ttft_s, logits, cache, stats["guard"], stats["decode_recomputed_tokens"] = self._decode(
            ids, cache, max_new_tokens, start, generate_kwargs, self._guard_margin(cache))
        if stats["guard"] is not None and stats["guard"]["repaired_at"] is not None:
            # Repaired: the prompt ended up prefilled in full, so nothing was saved; the cache is exact throughout.
            stats["guard"]["reuse_ratio"], stats["reuse_ratio"], exact = stats["reuse_ratio"], 0.0, len(ids)
        stats["ttft_ms"] = ttft_s * 1e3
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        entry = self._entry_from_cache(ids, cache, exact) if return_entry else None
        self._give_back(cache)
        return GenerationOutput(text, new_ids, stats, logits, entry)

    @torch.inference_mode()
    def score(self, prompt: Prompt, continuation: Sequence[int], reference: Optional[ReferenceEntry] = None,
              min_similarity: Optional[float] = None) -> tuple:
        """Teacher-forced next-token logits ([len(continuation), vocab], fp32) after the prompt and after each
        continuation token but the last, the prompt served as `generate` serves it (from `reference` when given
        and similar enough, else a full prefill), and the request's stats. Compared over a whole continuation (the
        full prefill's own greedy output), reuse and full prefill differ by a distance that moves smoothly where
        greedy outputs flip (docs/design.md, the selection ablation)."""
        cont = self._token_ids(continuation, "continuation", "a 1-D sequence of token ids")
        if len(cont) == 0:
            raise ValueError("continuation: expected at least one token id")
        check_gate(min_similarity)
        cont = torch.tensor(cont, dtype=torch.long, device=self.device)
        ids = self.tokenize(prompt, len(cont))
        gate = self.config.min_similarity if min_similarity is None else min_similarity
        cache, stats, _ = self._serve_prompt(ids, reference, gate, capacity=len(ids) + len(cont))
        done = cache.layers[0].used  # prompt positions already in the cache (none for a full prefill)
        inputs = torch.cat([ids[done:], cont[:-1]])
        with cache.active():
            if self.config.decode_recompute and len(cache.stale):
                # One step at a time, stale rows recomputed between steps as generate does them.
                steps = len(cont)
                heal, logits = _DecodeRecompute(self, ids, cache, self.config.decode_recompute, steps), []
                first = len(inputs) - steps + 1  # the prompt's tokens not in the cache: the last one
                for chunk in [inputs[:first]] + [inputs[i:i + 1] for i in range(first, len(inputs))]:
                    logits.append(self.model(input_ids=chunk[None], use_cache=True, logits_to_keep=1,
                                             **{self._cache_kw: cache}).logits[0].float())
                    heal.step()  # where generate's processor runs: after step t's forward, before t + 1's
                logits = torch.cat(logits)
                stats["decode_recomputed_tokens"] = heal.done
            else:
                logits = self.model(input_ids=inputs[None], use_cache=True, logits_to_keep=len(cont),
                                    **{self._cache_kw: cache}).logits[0].float()
                stats["decode_recomputed_tokens"] = 0
        self._give_back(cache)
        return logits, stats

    # ---- what the store, the CLI and the benchmarks use of an engine -----------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's weights, and every cache and entry the engine makes, live."""
        return self.decoder.embed_tokens.weight.device

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype of the K/V the model's attention writes, that of its projections (the largest floating-point
        tensor of the first layer's attention): a model may keep its embeddings and norms apart in fp32 (Ergo's
        `_keep_in_fp32_modules_strict`) while its attention runs in bf16."""
        attention = getattr(self.decoder.layers[0], "self_attn", None)
        weights = [p for p in attention.parameters() if p.is_floating_point()] if attention is not None else []
        return max(weights, key=torch.Tensor.numel).dtype if weights else self.decoder.embed_tokens.weight.dtype

    @property
    def token_bytes(self) -> int:
        """K/V bytes of one token in one layer (a request's kv_bytes is layers x tokens x this)."""
        return self.kv_heads * 2 * self.head_dim * self.kv_dtype.itemsize

    def tokenize(self, prompt: Prompt, max_new_tokens: int = 0) -> torch.Tensor:
        """A prompt's token ids (int64 [T] on the engine's device): a str through the tokenizer (no chat template),
        a sequence of ids as given. ValueError naming `prompt` when it is empty, holds ids outside the vocabulary,
        or does not fit, with `max_new_tokens`, in the positions the engine serves."""
        check_count("max_new_tokens", max_new_tokens, minimum=0)
        if self.kv_dtype != self._checked_dtype:  # every request goes through here
            raise ValueError(f"model: cast from {self._checked_dtype} to {self.kv_dtype} after this engine was made; "
                             "its rotary frequencies and checks were measured in the former: make another engine")
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
            if torch.is_tensor(ids) or _non_int_ids(ids):
                raise TypeError("tokenizer: expected it to return a list of int token ids for prompt, got "
                                f"{type(ids).__name__} {str(ids)[:80]}")
            self._check_vocabulary(ids, "prompt", "; the tokenizer made one outside it (one of another model?)")
        else:
            ids = self._token_ids(prompt, "prompt", "a str or a 1-D sequence of token ids")
        if len(ids) == 0:
            raise ValueError("prompt: empty prompt (no tokens)")
        if self.max_positions and len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt / max_new_tokens: {len(ids)} tokens + {max_new_tokens} new exceed "
                             f"{self.max_positions} positions ({self.arch.position_limit_reason})")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _token_ids(self, value, name: str, expected: str) -> List[int]:
        """A 1-D sequence or tensor of token ids as a list of ints inside the vocabulary, or TypeError/ValueError
        naming `name`. Only integers: a float or a digit string is not a token id, and int() would take both
        silently."""
        if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, Sequence) and \
                not (torch.is_tensor(value) and value.dim() == 1):
            raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
        if torch.is_tensor(value):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name}: expected integer token ids, got a {value.dtype} tensor")
            if value.device.type == "meta":
                raise ValueError(f"{name}: a tensor on the meta device holds no token ids")
            ids = value.tolist()
        else:
            bad = _non_int_ids(value)[:1]
            if bad:  # a list, not next(..., None): None is itself a bad id
                raise TypeError(f"{name}: expected integer token ids, got {type(bad[0]).__name__} {bad[0]!r}")
            ids = [int(t) for t in value]
        self._check_vocabulary(ids, name)
        return ids

    def _check_vocabulary(self, ids: List[int], name: str, why: str = "") -> None:
        # The model's vocabulary, not the tokenizer's: a tokenizer may know more ids than the embedding has rows.
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}), the model's vocabulary{why}")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of token ids: [n, hidden] in the model's dtype."""
        return self.decoder.embed_tokens(ids)

    def token_codes(self, embeddings: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SimHash codes (int64 [n, W]) of embeddings rotated by their position (default: row index): what LSH
        matching compares."""
        return matching.embedding_codes(embeddings, self.planes, self.config.embedding_rope_base, positions)

    # ---- steps -----------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """What decides whether another engine's entries are valid here: the config, the tokenizer, the dtype and
        a digest of every parameter and buffer (a fine-tune that keeps the embeddings, as LoRA usually does,
        changes K/V all the same)."""
        cfg = self.model.config.to_dict()
        cfg.pop("_name_or_path", None)
        probe = self.tokenizer("semshare fingerprint: 0123456789 Hello, world!")["input_ids"]
        tensors = [(name, t) for name, t in self.model.named_parameters()] + \
            [(name, t) for name, t in self.model.named_buffers()]
        weights = [[name, str(t.dtype), list(t.shape), tensor_digest(t)] for name, t in tensors]
        blob = json.dumps([cfg, type(self.tokenizer).__name__, len(self.tokenizer), probe, str(self.kv_dtype), weights],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _check_reference(self, reference: ReferenceEntry) -> None:
        if not isinstance(reference, ReferenceEntry):
            raise TypeError(f"reference: expected a ReferenceEntry, got {type(reference).__name__}")
        if reference.fingerprint != self.fingerprint:
            raise ValueError("reference: it was made by another model or tokenizer than this engine's (or before "
                             "this engine's weights changed)")
        # The fingerprint is the model's; the token codes are also the LSH settings' (a store rehashes saved codes
        # made with others instead of refusing them). Codes of other settings would match nothing, or wrong tokens.
        if reference.codes_lsh is not None and tuple(reference.codes_lsh) != self.codes_lsh:
            raise ValueError(f"reference: its token codes were made with other LSH settings ({', '.join(LSH_SETTINGS)}"
                             f" = {tuple(reference.codes_lsh)}) than this engine's {self.codes_lsh}")
        # A ReferenceEntry is a plain dataclass: a field swapped after it was made (K/V of another dtype, layout,
        # length or device; codes of another width) would fail inside an op or a copy, named as an argument the
        # caller never passed, or serve wrongly (exact_prefix=True taken as 1).
        ids = reference.token_ids
        if not torch.is_tensor(ids) or ids.dim() != 1 or ids.dtype != torch.long or ids.device.type == "meta":
            raise ValueError(f"reference: its token_ids are {_described(ids)}; expected an int64 [tokens] tensor")
        tokens = ids.numel()
        for name in ("keys", "values"):
            kv = getattr(reference, name)
            if not torch.is_tensor(kv) or kv.dtype != self.kv_dtype or kv.device.type == "meta" or \
                    tuple(kv.shape) != (self.num_layers, tokens, self.kv_heads, self.head_dim):
                raise ValueError(f"reference: its {name} are {_described(kv)}; this engine's are {self.kv_dtype} "
                                 f"[{self.num_layers}, {tokens} tokens, {self.kv_heads} KV heads, {self.head_dim}]")
        codes, words = reference.codes, (self.config.lsh_bits + 63) // 64
        if not torch.is_tensor(codes) or codes.dtype != torch.long or tuple(codes.shape) != (tokens, words) or \
                codes.device.type == "meta":
            raise ValueError(f"reference: its codes are {_described(codes)}; this engine's are int64 [{tokens} "
                             f"tokens, {words} words]")
        prefix = reference.exact_prefix
        if isinstance(prefix, bool) or not isinstance(prefix, numbers.Integral) or not 0 <= prefix <= tokens:
            raise ValueError(f"reference: its exact_prefix is {prefix!r}; expected an int in [0, {tokens}]")

    def _serve_prompt(self, ids: torch.Tensor, reference: Optional[ReferenceEntry], gate: float, capacity: int,
                      prefix_only: bool = False):
        """A cache holding what reuse provides of the prompt (positions 0..T-2; empty for a full prefill), the
        request's stats, and the exact prefix an entry of this prompt would have. `prefix_only`: only the
        reference's exact common prefix is taken, with no gate (generate)."""
        stats = {"mode": "full", "prompt_tokens": len(ids), "matched_tokens": 0,
                 "recomputed_tokens": [len(ids)] * self.num_layers, "similarity": None, "exact_tokens": 0,
                 "check_deviation": None}
        cache, kv_bytes, exact = None, None, len(ids)
        if reference is not None:
            self._check_reference(reference)
            match = self._prefix_match(reference, ids) if prefix_only else self._match(reference, ids)
            stats["matched_tokens"] = match.matched
            stats["similarity"] = match.matched / len(ids)
            if stats["similarity"] < gate and not prefix_only:
                stats["mode"] = "fallback"
            else:
                stats["mode"] = "reuse"
                cache = self._request_cache(capacity=capacity, used=len(ids) - 1)
                stats["recomputed_tokens"], stats["exact_tokens"], stats["check_deviation"] = \
                    self._assemble_and_recompute(cache, reference, ids, match)
                kv_bytes = cache.nbytes() + self.num_layers * self.token_bytes  # + the last prompt token
                # The rows before the first one some layer left reused were computed in every layer over exact K/V
                # (causal attention reads only the rows before): a full prefill's. With none left reused (an
                # extension of the reference, ratio 1.0) that is the whole prompt, and an entry of it serves a later
                # extension as a prefix (a growing chat's next turn). (Retention makes no entry: return_entry is
                # refused with retain_ratio, and _entry_from_cache refuses a compacted layer.)
                exact = kept_exact_prefix(int(cache.stale[0]) if len(cache.stale) else len(ids) - 1, len(ids))
        if cache is None:
            cache = self._request_cache(capacity=capacity)
        kv_full = self.num_layers * len(ids) * self.token_bytes
        stats.update(reuse_ratio=1.0 - sum(stats["recomputed_tokens"]) / (self.num_layers * len(ids)),
                     kv_bytes=kv_full if kv_bytes is None else kv_bytes, kv_bytes_full=kv_full)
        return cache, stats, exact

    def _guard_margin(self, cache: SemShareCache) -> float:
        """The guard watches a request served by reuse that kept stale rows: a reused row past the exact prefix in
        some layer (`cache.stale`, what the recompute left; not `recomputed_tokens`, which also counts the
        lookahead's rows), or K/V entries dropped by retain_ratio (`cache.dropped`: none when every layer keeps its
        whole prompt, as at retain_ratio 1.0 or within the sink tokens and observer window of a short one). An exact
        cache (an identical prompt, ratio 1.0) is not watched, nor a full prefill's (empty: nothing reused)."""
        stale = len(cache.stale) > 0 or cache.dropped
        return self.config.guard_margin if stale else 0.0

    def _entry_from_cache(self, ids: torch.Tensor, cache: SemShareCache, exact: int) -> ReferenceEntry:
        """Prompt positions 0..T-1 of every layer, copied out (the cache also holds the new tokens)."""
        n = len(ids)
        for layer in cache.layers:  # slot == position holds while no layer was compacted
            torch._check(layer.used >= n and bool((layer.kv_pos[:n] == torch.arange(n, device=ids.device)).all()),
                         lambda: "semshare cache: prompt slots are not in position order")
        return self._entry(ids, torch.stack([layer.keys[:n] for layer in cache.layers]),
                           torch.stack([layer.values[:n] for layer in cache.layers]), exact)

    def _entry(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, exact: int) -> ReferenceEntry:
        embeddings = self.embed(ids)
        return ReferenceEntry(ids.cpu(), keys, values, self.token_codes(embeddings).cpu(),
                              embeddings.float().mean(0).cpu(), self.fingerprint, exact, self.codes_lsh)

    def _layer_input(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states [1, n, hidden] that the model's own forward hands its first decoder layer for these
        tokens at these positions: whatever it does after embed_tokens (Granite's embedding_multiplier, ...) is
        done by the model itself. Its forward runs until the first layer is called, inside an empty semshare cache
        (so no attention mask is built).

        The hook is on the model, which other engines may share and run from other threads: it stops only this
        thread's forward and lets any other pass."""
        captured, caller = [], threading.get_ident()

        def stop(module, args, kwargs):
            if threading.get_ident() != caller:
                return None
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _FirstLayerReached

        handle = self.decoder.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with self._new_cache(capacity=1).active():
                self.decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False)
        except _FirstLayerReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the model's forward never called its first decoder layer")
        return captured[0]

    def _new_cache(self, capacity: int, used: int = 0, storage: Optional[tuple] = None) -> SemShareCache:
        return SemShareCache.allocate(self.num_layers, capacity, self.kv_heads, self.head_dim, self.head_dim,
                                      self.kv_dtype, self.device, used, storage)

    def _request_cache(self, capacity: int, used: int = 0) -> SemShareCache:
        """The cache of one request (`generate`, `score`), laid in the storage an earlier request gave back
        (`_give_back`) when that is large enough. New memory is paid for on first touch: on CPU a page fault per
        4 KiB, 40 ms for the 188 MB of a 4k-token SmolLM2 request against 8 ms to copy its prompt's K/V into warm
        memory, which made an identical prompt cost 2.5x a decode step. One request's storage stays held between
        requests; nothing of the last one is read (a layer reads only its first `used` slots)."""
        shape = (self.num_layers, capacity, self.kv_heads, self.head_dim)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and not SemShareCache.storage_fits(spare, shape, shape, self.kv_dtype, self.device):
            spare = None  # too small: the larger storage of this request replaces it when given back
        return self._new_cache(capacity, used, spare)

    def release_cache_storage(self) -> None:
        """Drop the cache storage kept from the last finished request for the next one: frees that memory (the next
        request allocates its own). A benchmark of a request's peak memory calls it first, so that the storage counts
        as the request's."""
        with self._spare_lock:
            self._spare = None

    def _give_back(self, cache: SemShareCache) -> None:
        """Hand a finished request's cache storage to the next request: nothing may hold a view of it any more
        (entries are copied out of the cache; `prefill`'s cache is the entry and is never given back)."""
        with self._spare_lock:
            if self._spare is None or self._spare[0].numel() < cache.storage[0].numel():
                self._spare = cache.storage

    def _match(self, reference: ReferenceEntry, ids: torch.Tensor) -> matching.Match:
        def codes(positions: torch.Tensor) -> torch.Tensor:  # hashed only for what edit alignment leaves unmatched
            positions = positions.to(self.device)
            return self.token_codes(self.embed(ids[positions]), positions).cpu()

        return matching.match_tokens(reference.token_ids, ids.cpu(), self.config.matching, reference.codes, codes,
                                     self.config.lsh_max_distance)

    @staticmethod
    def _prefix_match(reference: ReferenceEntry, ids: torch.Tensor) -> matching.Match:
        """The reference's exact common prefix with the prompt: the same tokens at the same positions, within the
        rows the reference holds exactly (its `exact_prefix`), and nothing else."""
        n = min(matching.common_prefix(reference.token_ids.tolist(), ids.tolist()), reference.exact_prefix)
        return matching.exact_prefix_match(n, len(ids))

    def _assemble_and_recompute(self, cache: SemShareCache, reference: ReferenceEntry, ids: torch.Tensor,
                                match: matching.Match) -> tuple:
        """Steps 2-4 for prompt positions 0..T-2; returns the recomputed tokens per layer (last token included), the
        exact prefix (positions no layer recomputes) and the check layer's mean relative deviation."""
        cfg, prefill = self.config, len(ids) - 1
        window = min(_OBSERVER_WINDOW, prefill) if cfg.retain_ratio is not None else 0
        exact = exact_prefix(match, reference.exact_prefix, prefill - window)
        # The exact prefix is the reference's K/V at the same positions: one plain copy of every layer.
        cache.keys[:, :exact] = reference.keys[:, :exact].to(self.device)
        cache.values[:, :exact] = reference.values[:, :exact].to(self.device)
        keep = (match.dst >= exact) & (match.dst < prefill)
        dst, src = match.dst[keep].to(self.device), match.src[keep].to(self.device)
        delta = dst - src if cfg.rope_correction else torch.zeros_like(dst)
        self._reuse_kv(cache, reference, src, dst, delta)
        # retention's observer window: recomputed in every layer
        plan = recompute_rows(match, prefill, self.num_layers, cfg, exact, window)
        with cache.active():
            deviation = self._recompute(cache, ids[:prefill], plan, window, exact, match.unmatched_mask()[:prefill])
        if cfg.retain_ratio is not None:
            self._retain(cache, prefill, window)
        return [c + 1 + plan.lookahead for c in plan.counts], exact, deviation

    def _reuse_kv(self, cache: SemShareCache, reference: ReferenceEntry, src: torch.Tensor, dst: torch.Tensor,
                  delta: torch.Tensor) -> None:
        """Copy the matched tokens' K/V into the cache, keys re-rotated by delta: one `rope_reuse_` per group of
        layers that share their RoPE (a strided view when the group's layers are evenly spaced, else one call per
        run of consecutive layers)."""
        ref_k, ref_v = reference.keys.to(self.device), reference.values.to(self.device)
        for group in self.rope_groups:
            inv_freq = group.inv_freq
            group_delta = delta * group.sign
            if inv_freq is None:  # no RoPE in these layers: keys carry no position, copy them as they are
                inv_freq, group_delta = self.arch.inv_freq[group.layer_type], torch.zeros_like(delta)
            inv_freq = inv_freq.to(self.device)
            for layers in layer_slices(group.layers):
                ops.rope_reuse_(cache.keys[layers], cache.values[layers], ref_k[layers], ref_v[layers], src, dst,
                                group_delta, inv_freq, group.neox)

    def _run_layer(self, idx: int, hidden: torch.Tensor, rows: torch.Tensor, cache: SemShareCache) -> torch.Tensor:
        """Decoder layer `idx` on the hidden states [1, len(rows), hidden] of positions `rows` (sorted, unique): as
        the model's own forward calls it, with its K/V written into the cache at those positions."""
        cache.set_write_positions(idx, rows)
        position_ids = rows[None]
        try:
            out = self.decoder.layers[idx](
                hidden, attention_mask=None, position_ids=position_ids, use_cache=True,
                position_embeddings=self.arch.position_embeddings(self.decoder, hidden, position_ids, idx),
                **{self._layer_cache_kw: cache})
        finally:
            cache.set_write_positions(idx, None)
        return out[0] if isinstance(out, tuple) else out

    def _write_kv(self, idx: int, hidden: torch.Tensor, rows: torch.Tensor, cache: SemShareCache) -> None:
        """Decoder layer `idx` on positions `rows` up to the write of their K/V into the cache, and no further."""
        layer = cache.layers[idx]
        layer.stop_after_write = True
        try:
            self._run_layer(idx, hidden, rows, cache)
        except KVWritten:
            return
        finally:
            layer.stop_after_write = False
        raise RuntimeError(f"decoder layer {idx} ran to its end without writing K/V to the cache")

    def _probe_rope(self) -> List[RopeGroup]:
        """Measure how each layer's keys depend on position: the same inputs at positions p and p + delta through
        every layer, then the rotation (of the layer's frequencies, in either pair convention) that maps the first
        keys onto the second, or none if they are equal (a layer without RoPE). A layer where neither holds is
        refused. Returns the layers grouped by rotation."""
        n, delta = 4, 37
        if self.max_positions is not None and self.max_positions < n + delta + 1:
            # Both sets inside the limit and apart: a position in both would be written twice in one call, and the
            # keys compared would not be the same inputs' (a model of 8 positions was refused as not RoPE).
            n = max(1, min(n, (self.max_positions - 1) // 2))
            delta = max(n, self.max_positions - n - 1)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (n,), generator=gen).to(self.device)
        hidden = self._layer_input(ids, torch.arange(n, device=self.device))
        hidden = torch.cat([hidden, hidden], dim=1)
        rows = torch.cat([torch.arange(n), torch.arange(n) + delta]).to(self.device)
        cache = self._new_cache(capacity=n + delta)
        tol = 1e-4 if self.kv_dtype == torch.float32 else 2e-2
        found: Dict[tuple, List[int]] = {}
        with cache.active():
            for idx in range(self.num_layers):
                try:
                    self._run_layer(idx, hidden, rows, cache)
                except Exception as err:  # anything a new family does differently: refuse, do not guess
                    raise refusal(self.model, f"its decoder layer {idx} cannot be run one layer at a time "
                                              f"({type(err).__name__}: {err})") from err
                keys = cache.layers[idx].keys.float()
                k1, k2 = keys[:n], keys[delta: delta + n]
                size = k2.abs().max().clamp_min(1e-30)
                layer_type = self.arch.layer_types[idx]
                inv_freq = self.arch.inv_freq[layer_type].to(self.device)
                if ((k1 - k2).abs().max() / size) <= tol:
                    key = (layer_type, None, 1)
                else:
                    # Pair conventions, and the direction (nanochat's rotate_half turns keys by -theta).
                    conventions = [(neox, sign) for neox in (True, False) for sign in (1, -1)
                                   if 2 * len(inv_freq) <= self.head_dim and
                                   ((oracle.rotate(k1, torch.full((n,), sign * delta, device=self.device),
                                                      inv_freq, neox) - k2).abs().max() / size) <= tol]
                    if not conventions:
                        raise refusal(self.model, f"the keys of decoder layer {idx} do not rotate as RoPE with its "
                                                  f"rotary embedding's {len(inv_freq)} frequencies in either pair "
                                                  "convention, so reused keys cannot be moved to new positions")
                    key = (layer_type, *conventions[0])
                found.setdefault(key, []).append(idx)
        return [RopeGroup(tuple(layers), layer_type, None if neox is None else self.arch.inv_freq[layer_type],
                          True if neox is None else neox, sign)
                for (layer_type, neox, sign), layers in found.items()]

    def _self_check(self) -> None:
        """A short random prompt three ways: the model's own forward with its own attention (stock), the engine's
        full prefill, and the engine's layer-by-layer recompute of every token. The logits of the first two and the
        K/V of the last two must agree to rounding, or the model is refused: whatever this engine does not know
        about a family shows here rather than as a silently wrong answer. Logits that disagree on the first prompt
        are tried on two more before the model is refused: in half precision, rounding alone can flip a
        mixture-of-experts routing at a near-tie (one row far off, the rest within rounding), which another prompt
        does not repeat, while an engine that computes something else than the model fails them all."""
        n = 12 if self.max_positions is None else max(1, min(12, self.max_positions - 1))

        def both_ways(seed: int):  # the prompt, the model's own logits, the engine's cache and logits
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.model.config.vocab_size, (n,), generator=gen).to(self.device)
            with watching_mask_windows() as windows:
                stock = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
            cache = self._new_cache(capacity=n)
            with cache.active():
                engine = self.model(input_ids=ids[None], use_cache=True, **{self._cache_kw: cache}).logits[0].float()
            return ids, stock, cache, engine, windows

        ids, stock, full, engine, mask_windows = both_ways(1)
        # A window longer than the check's prompt changes nothing in it: each declared one must be the window the
        # layer's attention call passes (the one the engine applies), or a mask-only window would go unseen.
        def binds(window):
            return window is not None and window > 0 and (self.max_positions is None or window < self.max_positions)

        for idx, window in enumerate(declared_windows(self.model.config, self.num_layers)):
            if binds(window) and full.layers[idx].window != window:
                raise refusal(self.model, f"a sliding window of {window} positions (config.sliding_window, layer "
                                          f"{idx}) that its attention applies only through its mask, which the "
                                          "engine replaces")
        # And the other way: a window the attention call passes, which SDPA and eager ignore, must be one that a mask
        # of the model's own forward applies (OLMoE given a sliding_window passes it and masks causally). Flash
        # attention applies the keyword itself, as the engine does.
        if "flash" not in previous_implementation(self.model.config):
            for idx, layer in enumerate(full.layers):
                if binds(layer.window) and layer.window not in mask_windows:
                    built = sorted({"none" if w is None else str(w) for w in mask_windows})
                    raise refusal(self.model, f"its attention in layer {idx} passes a sliding window of "
                                              f"{layer.window} positions that no attention mask of its own forward "
                                              f"applies (the masks' windows: {', '.join(built) or 'no mask built'}), "
                                              "so its own output and the engine's would differ past "
                                              f"{layer.window} tokens")
        tol = 1e-3 if self.kv_dtype == torch.float32 else 5e-2

        def differ(stock: torch.Tensor, engine: torch.Tensor) -> bool:
            scale = stock.abs().max().clamp_min(1.0)
            return not torch.isfinite(engine).all() or bool((engine - stock).abs().max() > tol * scale)

        first = (engine - stock).abs().max().item()
        for seed in (2, 3):
            if not differ(stock, engine):
                break
            ids, stock, full, engine, _ = both_ways(seed)
        if differ(stock, engine):
            raise refusal(self.model, "its logits through semshare attention differ from its own attention by "
                                      f"{first:.3g} on a {n}-token prompt (and on two more)")
        by_layer = self._new_cache(capacity=n, used=n)
        rows = torch.arange(n, device=self.device)
        with by_layer.active():
            hidden = self._layer_input(ids, rows)
            for idx in range(self.num_layers):
                hidden = self._run_layer(idx, hidden, rows, by_layer)
        for kind, a, b in (("keys", full.keys, by_layer.keys), ("values", full.values, by_layer.values)):
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()
            if not err <= tol:
                raise refusal(self.model, f"its {kind} recomputed layer by layer differ from its own forward's by "
                                          f"{err:.3g} (relative): the model does something between its layers that "
                                          "the engine does not")

    def _recompute(self, cache: SemShareCache, ids: torch.Tensor, plan: RowPlan, window: int, exact: int,
                   unmatched: torch.Tensor) -> Optional[float]:
        """Run the decoder layers on a nested, shrinking set of positions past `exact`; K/V go into the cache as they
        come, `plan.counts[i]` rows in layer i. The rows of each next layer are the best-ranked of this one
        (`selection_scores`): ranked once at the last check layer, or again at every layer that shrinks the set
        (`progressive`), after the lookahead's pass when the plan has one. `unmatched`: bool [len(ids)], the rows
        without reusable K/V. Returns the check layer's mean relative deviation (None when nothing needed ranking)."""
        cfg, prefill, num_layers = self.config, len(ids), self.num_layers
        n = prefill - exact
        if n == 0:
            return None
        schedule = RowSchedule(plan.counts, plan.mandatory[exact:].to(self.device), cfg, num_layers,
                               plan.first[exact:], unmatched[exact:])
        lookahead = self._lookahead(cache, ids, exact, unmatched, plan.lookahead) if plan.lookahead else None
        hidden = self._layer_input(ids[exact + schedule.rows], exact + schedule.rows)
        cache.observe = min(cfg.query_window, n) if cfg.selection in QUERY_SELECTIONS else 0
        cache.retain_observe = window

        def attention(layer, positions: torch.Tensor) -> Optional[torch.Tensor]:
            if lookahead is not None:
                return lookahead[positions - exact]
            return None if layer.scores is None else layer.scores[positions]

        for idx in range(num_layers):
            if len(schedule.rows) == 0:  # nested sets: every deeper layer reuses everything too
                break
            layer, positions = cache.layers[idx], exact + schedule.rows
            ranks = schedule.ranks(idx)
            if ranks:
                reused = (layer.keys[positions].clone(), layer.values[positions].clone())
            if schedule.shrinks(idx) and (not ranks or cfg.selection not in QUERY_SELECTIONS):
                # Rows that the next layer drops need only their K/V here: a K/V-only pass over every row (the model's
                # own layer, stopped once its K/V are written), then the whole layer over the rows that go on, whose
                # queries see every row's fresh K/V. The same cache as running the layer over every row, without the
                # attention and MLP of the rows dropped: at the last check layer most of them.
                self._write_kv(idx, hidden, positions, cache)
                if ranks:
                    schedule.rank(idx, reused, (layer.keys[positions], layer.values[positions]),
                                  attention(layer, positions))
                keep = schedule.advance(idx)
                if len(keep):  # (none: every deeper layer reuses everything)
                    hidden = self._run_layer(idx, hidden[:, keep], exact + schedule.rows, cache)
                continue
            hidden = self._run_layer(idx, hidden, positions, cache)
            if ranks:
                schedule.rank(idx, reused, (layer.keys[positions], layer.values[positions]),
                              attention(layer, positions))
            keep = schedule.advance(idx)
            if keep is not None:
                hidden = hidden[:, keep]
        cache.observe = cache.retain_observe = 0
        # What decode_recompute takes, in position order: a row then runs over the rows before it already fresh. In
        # the budget's order (most stale first) a row done in an early step would attend to stale rows before it that
        # a later step fixes, and keep the K/V computed from them.
        cache.stale = exact + schedule.stale()
        return schedule.deviation

    def _lookahead(self, cache: SemShareCache, ids: torch.Tensor, exact: int, unmatched: torch.Tensor,
                   q: int) -> torch.Tensor:
        """ProphetKV's first stage: the last `q` positions of ids (`RowPlan.lookahead`) run through every layer over
        the cache as assembled (reused K/V; the `unmatched` rows, which hold none, hidden), and the attention they
        pay each position of [exact, len(ids)) in every layer past the check layers, normalised per layer, summed:
        fp32 [len(ids) - exact]. Layer 1's deviation sees little of a change far back; deep layers read it from
        everywhere, and these queries say which rows they read (docs/design.md, "Looking ahead"). The cache is left
        as it was: the queries' K/V and every slot's position are put back."""
        prefill = len(ids)
        queries = torch.arange(prefill - q, prefill, device=self.device)
        # Every unmatched row, queries too: a query writes its own K/V in each layer before that layer reads them.
        hidden_rows = unmatched.to(self.device).nonzero().flatten()
        touched = torch.cat([queries, hidden_rows])
        saved = (cache.keys[:, touched].clone(), cache.values[:, touched].clone(),
                 [layer.kv_pos[hidden_rows].clone() for layer in cache.layers])
        deep = effective_check_layers(self.config)  # < num_layers, or no row would be left to choose (no pass)
        fused = torch.zeros(prefill - exact, dtype=torch.float32, device=self.device)
        # Hidden: invisible to attention (partial_attn's contract) and zero, since a masked slot's NaN would still
        # reach the output through 0 * NaN.
        cache.keys[:, hidden_rows], cache.values[:, hidden_rows] = 0, 0
        for layer in cache.layers:
            layer.kv_pos[hidden_rows] = -1
        cache.observe = q
        try:
            hidden = self._layer_input(ids[queries], queries)
            for idx in range(self.num_layers):
                hidden = self._run_layer(idx, hidden, queries, cache)
                if idx >= deep:
                    paid = cache.layers[idx].scores[exact:prefill].float()
                    fused += paid / paid.sum().clamp_min(1e-30)
        finally:
            cache.observe = 0
            cache.keys[:, touched], cache.values[:, touched] = saved[0], saved[1]
            for layer, kv_pos in zip(cache.layers, saved[2]):
                layer.kv_pos[hidden_rows] = kv_pos
                layer.scores = None
        return fused

    def _recompute_stale(self, cache: SemShareCache, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Prompt positions (sorted) through every layer, their K/V overwritten in place (decode_recompute). Their
        queries see what the cache holds at each layer now (causal by position: none of the new tokens), as the
        prefill's recomputed rows did; the last layer's K/V are all that is kept of them, so it stops there."""
        hidden = self._layer_input(ids[positions], positions)
        for idx in range(self.num_layers - 1):
            hidden = self._run_layer(idx, hidden, positions, cache)
        self._write_kv(self.num_layers - 1, hidden, positions, cache)

    def _retain(self, cache: SemShareCache, prefill: int, window: int) -> None:
        """Keep fewer KV entries in deeper layers: the most attended-to by the observer window, plus the first
        tokens (attention sinks) and the window itself; the rest are dropped and the layer compacted."""
        cfg = self.config
        floor = min(prefill, window + _SINK_TOKENS)
        counts = decaying_counts(prefill, self.num_layers, cfg.check_layers, floor, cfg.retain_ratio * prefill,
                                 cfg.retain_decay)
        for layer, count in zip(cache.layers, counts):
            if count >= prefill or layer.retain_scores is None:
                continue
            scores = layer.retain_scores[:prefill].clone()
            scores[:_SINK_TOKENS] = math.inf
            scores[prefill - window:] = math.inf
            kept = torch.topk(scores, count).indices.sort().values
            layer.keep(kept)
            cache.dropped = True

    def _decode(self, ids: torch.Tensor, cache: SemShareCache, max_new_tokens: int, start: float,
                generate_kwargs: Dict, guard_margin: float) -> tuple:
        """Greedy decode over `cache` with HF generate. With a guard margin (a reused cache with stale rows), a step
        whose best token leads by less is not taken: the prompt and the tokens so far are prefilled in full into a
        new cache and decoding goes on from there (`_MarginGuard`). With `decode_recompute`, stale rows are
        recomputed between steps (`_DecodeRecompute`). Returns the new token ids, the first-token time, the logits
        when asked for, the cache the request ended with, the guard's record (None if unwatched) and the number of
        rows recomputed during decode."""
        # Greedy, one beam, over the engine's own cache, whatever the model's generation_config says about sampling,
        # beams or the cache to build (a "static" cache_implementation there would make HF refuse the engine's cache).
        # use_cache: without it HF feeds the whole sequence again at every step, into a cache that holds it already.
        kwargs = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "use_cache": True,
                  "cache_implementation": None, "max_new_tokens": max_new_tokens,
                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **generate_kwargs}
        timer = kwargs["streamer"] = _FirstTokenTimer(start, generate_kwargs.get("streamer"))
        processors = LogitsProcessorList(generate_kwargs.get("logits_processor") or [])
        watch = _MarginGuard(guard_margin, len(ids), bool(kwargs.get("output_logits"))) if guard_margin > 0 else None
        # A stopping criterion, so after the guard's processor: a step it refuses is not taken, so nothing is
        # recomputed for it.
        heal = _DecodeRecompute(self, ids, cache, self.config.decode_recompute, max_new_tokens,
                                self._stop_token_ids(kwargs)) if self.config.decode_recompute and len(cache.stale) \
            else None
        criteria = generate_kwargs.get("stopping_criteria")
        if heal is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList(list(criteria or []) + [heal])
        try:
            out = self._generate(ids, cache, {**kwargs, "logits_processor": LogitsProcessorList(
                ([watch] if watch is not None else []) + list(processors))})
            done, record = [], None if watch is None else {
                "margin": guard_margin, "repaired_at": None, "lowest_lead": watch.lowest}
        except _GuardTripped as trip:
            done = trip.generated
            record = {"margin": guard_margin, "repaired_at": len(done), "lowest_lead": min(watch.lowest, trip.lead)}
            timer.restart()
            cache = self._request_cache(capacity=len(ids) + max_new_tokens)
            out = self._generate(torch.cat([ids, ids.new_tensor(done)]), cache,
                                 {**kwargs, "max_new_tokens": max_new_tokens - len(done),
                                  "logits_processor": processors, "stopping_criteria": criteria})
        logits = getattr(out, "logits", None)  # a GenerateOutput when return_dict_in_generate=True
        if logits is not None and done:
            logits = tuple(watch.scores[:len(done)]) + tuple(logits)
        sequences = getattr(out, "sequences", out)
        new_ids = done + sequences[0, len(ids) + len(done):].tolist()
        return new_ids, timer.first_token_s, logits, cache, record, 0 if heal is None else heal.done

    def _stop_token_ids(self, kwargs: Dict) -> frozenset:
        """The end-of-sequence ids a generate call with `kwargs` stops at (its eos_token_id, else its generation
        config's, else the model's)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else getattr(config, "eos_token_id", None)
        if eos is None:
            return frozenset()
        eos = eos.tolist() if torch.is_tensor(eos) else eos
        return frozenset(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))

    def _generate(self, ids: torch.Tensor, cache: SemShareCache, kwargs: Dict):
        with cache.active():
            return self.model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                       **{self._cache_kw: cache}, **kwargs)


def _non_int_ids(values) -> list:
    """The values that are not token ids (only integers are; a bool is not one): a float or a digit string, which
    int() would take silently."""
    return [t for t in values if isinstance(t, bool) or not isinstance(t, numbers.Integral)]


def _described(value) -> str:
    """A tensor's dtype, shape and device (or a non-tensor's type) for a message."""
    if torch.is_tensor(value):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return f"a {type(value).__name__}"


# HF generate arguments the engine sets itself: the prompt and its cache are the engine's, and decoding is one greedy
# sequence over that cache (assisted decoding would crop it).
_ENGINE_GENERATE_ARGS = ("input_ids", "inputs_embeds", "attention_mask", "past_key_values", "cache", "inputs",
                         "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def check_generate_kwargs(generate_kwargs: Dict) -> None:
    """Refuse by name the HF generate arguments `ReuseEngine.generate` cannot pass on (each got HF's own error, or
    was served wrongly: use_cache=False gave other tokens from the third on)."""
    taken = [name for name in _ENGINE_GENERATE_ARGS if name in generate_kwargs]
    if taken:
        raise TypeError(f"{taken[0]}: set by the engine (the prompt, its cache and greedy decoding over it are the "
                        "engine's), not passed to HF generate")
    if generate_kwargs.get("num_return_sequences", 1) != 1 or generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("num_return_sequences / num_beams: the engine serves one sequence per request "
                         "(batch size 1); run several requests instead")
    if generate_kwargs.get("use_cache", True) is not True:
        raise ValueError("use_cache: the engine decodes over its own cache; it cannot be turned off")
    processors = generate_kwargs.get("logits_processor")
    if processors is not None and (not isinstance(processors, (list, tuple)) or not all(map(callable, processors))):
        raise TypeError(f"logits_processor: expected a list of logits processors, got {type(processors).__name__}")
    streamer = generate_kwargs.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise TypeError(f"streamer: expected an HF streamer (with put and end), got {type(streamer).__name__}")


# The ReuseConfig fields the token codes depend on: fixed for an engine's life (`using` refuses to change them).
LSH_SETTINGS = ("lsh_bits", "lsh_seed", "embedding_rope_base")


class _FirstLayerReached(Exception):
    pass


# Digests are remembered on each tensor (tensor_digest): engines made on the same model share the pass over its
# weights, and an in-place change of a weight (its version counter moves) is hashed again.
_DIGEST_CHUNK = 1 << 20  # int64 words per step: bounds the extra memory of hashing a large tensor
_DIGEST_MULTIPLIERS: Dict[torch.device, torch.Tensor] = {}


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's bytes in one pass on its own device: the bytes as 64-bit words, each multiplied by a
    fixed odd random word and summed with wrap-around per chunk, chunks weighted by odd numbers. A change of any one
    word changes the sum (an odd multiplier is invertible mod 2^64); this is a checksum against accidental equality
    (a fine-tune, a different checkpoint), not against a forger."""
    # The digest is remembered on the tensor itself, keyed by its version counter and storage: a cache keyed by
    # id() would hand a freed tensor's digest to a new one that reuses its address.
    key = (t._version, t.data_ptr(), t.dtype, tuple(t.shape), t.device)
    cached = getattr(t, "_semshare_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        mult = _DIGEST_MULTIPLIERS.get(t.device)
        if mult is None:
            gen = torch.Generator().manual_seed(0x5E5A)
            mult = torch.randint(-2**62, 2**62, (_DIGEST_CHUNK,), generator=gen, dtype=torch.int64) * 2 + 1
            mult = _DIGEST_MULTIPLIERS[t.device] = mult.to(t.device)
        total = torch.zeros((), dtype=torch.int64, device=t.device)
        step = 8 * _DIGEST_CHUNK
        for c, start in enumerate(range(0, raw.numel(), step)):
            part = raw[start:start + step]
            if part.numel() % 8:
                part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
            words = part.view(torch.int64)
            total += (words * mult[: words.numel()]).sum() * (2 * c + 1)
        digest = f"{int(total) & (2**64 - 1):016x}:{raw.numel()}"
    try:
        t._semshare_digest = (key, digest)
    except (AttributeError, RuntimeError):  # a tensor subclass that takes no attributes: digest again next time
        pass
    return digest


def check_gate(min_similarity) -> None:
    """A per-call similarity gate: None (the config's) or a real number in [0, 1] (numpy's too), else TypeError or
    ValueError naming it."""
    if min_similarity is None:
        return
    if isinstance(min_similarity, bool) or not isinstance(min_similarity, numbers.Real):
        raise TypeError(f"min_similarity: expected None or a number in [0, 1], got {type(min_similarity).__name__} "
                        f"{min_similarity!r}")
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity: expected None or a number in [0, 1], got {min_similarity!r}")


def check_count(name: str, value, minimum: int) -> int:
    """An integer argument (not a bool, not a float) of at least `minimum`, as an int (numpy's integers too), or
    TypeError/ValueError naming it. The one integer check of the package's entry points (engine, store, connector)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected at least {minimum}, got {value}")
    return int(value)


def layer_slices(layers: Sequence[int]) -> List[slice]:
    """Index slices covering the given sorted layers: one strided slice when they are evenly spaced, else one per
    run of consecutive layers."""
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(steps) <= 1:
        step = steps.pop() if steps else 1
        return [slice(layers[0], layers[-1] + 1, step)]
    runs, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[i - 1] + 1:
            runs.append(slice(layers[start], layers[i - 1] + 1))
            start = i
    return runs


_OBSERVER_WINDOW = 16  # last prompt tokens whose attention ranks KV entries for retention (SnapKV-style)
_SINK_TOKENS = 4  # first tokens always kept: models park attention there
