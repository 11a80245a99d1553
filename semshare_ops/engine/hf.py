"""Hugging Face transformers shims: a token-major KV cache and an attention function that runs partial_attn.

The model's own decoder layers do all the work (norms, projections, RoPE, MLP); these shims only decide where
K/V go and which keys each query sees:
- `TokenMajorLayer` keeps one layer's K/V as `[slots, H, D]` with an explicit position per slot (`kv_pos`, -1 for
  an empty slot), so a cache assembled from another prompt, recomputed at arbitrary positions or compacted, is
  still exact under `partial_attn`.
- `semshare_attention` is registered in transformers' `AttentionInterface` as "semshare". With a `SemShareCache`
  active it calls `partial_attn` with the queries' positions and what the model's attention passes: its sliding
  window, logit soft-capping and attention sinks (a keyword it does not know raises instead of being ignored).
  Otherwise it runs the attention the model had before (SDPA, eager, ...) over the mask that attention expects
  ("semshare" is registered in `AttentionMaskInterface` too), so a model switched to it keeps working with HF's
  own caches and serves exactly as before. A step whose queries are every position 0..n-1 of a cache holding
  exactly those positions (a full prefill, a check layer of reuse) is plain causal attention: on the device types
  in `CAUSAL_SDPA_DEVICE_TYPES` it goes to SDPA's causal kernel instead, when no window, cap or sink applies. That
  is CUDA only, where SDPA's flash backend is the tuned kernel to beat; on CPU `partial_attn` measured 129 GFLOP/s
  against SDPA's 118 (fp32, 2 cores, causal 4096 tokens) and keeps the step.
Batch size 1: one request is one sequence.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import ops

ATTENTION_NAME = "semshare"
CAUSAL_SDPA_DEVICE_TYPES = ("cuda",)  # where whole-cache causal steps go to SDPA (see the module docstring)
_ACTIVE_CACHE: contextvars.ContextVar[Optional["SemShareCache"]] = contextvars.ContextVar("semshare_cache",
                                                                                         default=None)
# The attention implementation each switched model had before, by id() of its config objects: calls outside a
# semshare cache go there.
_PREVIOUS_ATTENTION: dict = {}


class KVWritten(Exception):
    """Raised by a layer set to `stop_after_write`: the decoder layer's K/V are in the cache, the rest is not run."""


class TokenMajorLayer(CacheLayerMixin):
    """One layer's K/V in token-major buffers; `used` slots are live, `length` positions have been seen."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, used: int = 0):
        super().__init__()
        self.keys, self.values = keys, values  # [capacity, H, D], [capacity, H, Dv]
        self.kv_pos = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        self.kv_pos[:used] = torch.arange(used, device=keys.device)
        self.used = used
        self.length = used
        self.write_positions: Optional[torch.Tensor] = None  # set for a recompute step; None appends
        self.scores: Optional[torch.Tensor] = None  # attention paid to each slot by the observer queries
        self.retain_scores: Optional[torch.Tensor] = None  # ... by retention's observer window (retain_ratio)
        self.in_order = True  # slot i holds position i for every live slot (no compaction, no gap)
        self.causal_step = False  # the last update wrote every position 0..used-1: plain causal attention
        self.step_positions: Optional[torch.Tensor] = None  # positions of the last update's tokens (its queries)
        self.window: Optional[int] = None  # the sliding window the last attention call passed (-1: none)
        self.stop_after_write = False  # raise KVWritten once the step's K/V are written (a K/V-only pass)
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.keys.shape[0])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((capacity, *old.shape[1:]))
            new[: self.used] = old[: self.used]
            setattr(self, name, new)
        kv_pos = self.kv_pos.new_full((capacity,), -1)
        kv_pos[: self.used] = self.kv_pos[: self.used]
        self.kv_pos = kv_pos

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        torch._check(key_states.shape[0] == 1, lambda: "semshare cache: batch size must be 1")
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [n, H, D]
        n = k.shape[0]
        if self.write_positions is not None:  # recompute: slot == position until the layer is compacted
            slots = positions = self.write_positions
            # write_positions are sorted and unique (the pipeline's nested row sets), so n == used means 0..used-1.
            self.causal_step = self.in_order and n == self.used
        else:  # append: decode steps and plain prefill
            if self.used + n > self.keys.shape[0]:
                self._grow(self.used + n)
            slots = torch.arange(self.used, self.used + n, device=k.device)
            positions = torch.arange(self.length, self.length + n, device=k.device)
            self.in_order = self.in_order and self.used == self.length
            self.causal_step = self.in_order and self.used == 0
            self.used += n
            self.length += n
        self.keys.index_copy_(0, slots, k)
        self.values.index_copy_(0, slots, v)
        self.kv_pos.index_copy_(0, slots, positions)
        self.step_positions = positions
        if self.stop_after_write:
            raise KVWritten
        return self.keys[: self.used], self.values[: self.used]

    def keep(self, slots: torch.Tensor) -> None:
        """Compact the layer to the given live slots (retention); positions stay exact through kv_pos."""
        self.keys = self.keys[slots].clone()
        self.values = self.values[slots].clone()
        self.kv_pos = self.kv_pos[slots].clone()
        self.used = len(slots)
        self.in_order = False

    def nbytes(self) -> int:
        return self.used * (self.keys[0].numel() + self.values[0].numel()) * self.keys.element_size()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.used + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("semshare cache: beam search is not supported (batch size 1)")


class SemShareCache(Cache):
    """An HF `Cache` of `TokenMajorLayer`s, one per decoder layer."""

    def __init__(self, layers: List[TokenMajorLayer], keys: torch.Tensor, values: torch.Tensor):
        super().__init__(layers=layers)
        self.keys, self.values = keys, values  # [L, capacity, H, D]: the layers start as views of these
        self.storage: Optional[tuple] = None  # the flat (keys, values) buffers they lie in, when allocate made them
        # > 0: record the attention the last `observe` queries of a recompute step pay (layer.scores: the ranking's
        # query window, or the lookahead's queries), and that the last `retain_observe` pay (layer.retain_scores)
        self.observe = 0
        self.retain_observe = 0
        # Prompt positions that hold reused K/V in some layer, in position order (set by the engine's recompute;
        # what ReuseConfig.decode_recompute takes): none for a full prefill.
        self.stale = torch.zeros(0, dtype=torch.long, device=keys.device)
        self.dropped = False  # whether retain_ratio dropped K/V entries from some layer (set by the engine)

    @classmethod
    def allocate(cls, num_layers: int, capacity: int, heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, device, used: int = 0,
                 storage: Optional[tuple] = None) -> "SemShareCache":
        """Layers that are views of one [L, capacity, H, D] K and V allocation (what rope_reuse_ fills at once):
        new zeroed memory, or the front of `storage`, flat (keys, values) buffers of the dtype and device at least
        that large (`storage_fits`), whose old contents are never read (only a layer's first `used` slots are)."""
        k_shape, v_shape = (num_layers, capacity, heads, head_dim), (num_layers, capacity, heads, v_head_dim)
        if storage is None:
            storage = (torch.zeros(math.prod(k_shape), dtype=dtype, device=device),
                       torch.zeros(math.prod(v_shape), dtype=dtype, device=device))
        torch._check(cls.storage_fits(storage, k_shape, v_shape, dtype, device),
                     lambda: "semshare cache: the storage handed in is too small or of another dtype or device")
        keys = storage[0][:math.prod(k_shape)].view(k_shape)
        values = storage[1][:math.prod(v_shape)].view(v_shape)
        cache = cls([TokenMajorLayer(keys[i], values[i], used) for i in range(num_layers)], keys, values)
        cache.storage = storage
        return cache

    @staticmethod
    def storage_fits(storage: tuple, k_shape: tuple, v_shape: tuple, dtype: torch.dtype, device) -> bool:
        return all(buf.dtype == dtype and buf.device == torch.device(device) and buf.numel() >= math.prod(shape)
                   for buf, shape in zip(storage, (k_shape, v_shape)))

    def set_write_positions(self, layer_idx: int, positions: Optional[torch.Tensor]) -> None:
        self.layers[layer_idx].write_positions = positions

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @contextlib.contextmanager
    def active(self) -> Iterator["SemShareCache"]:
        """Route the "semshare" attention of model calls inside this block to this cache."""
        token = _ACTIVE_CACHE.set(self)
        try:
            yield self
        finally:
            _ACTIVE_CACHE.reset(token)


# Keywords that attention modules pass to their attention function. SERVED change the result and are applied;
# NEUTRAL do not (dropout is 0 in eval mode, and a nonzero value is refused). Anything else raises: a model that
# passes something this function does not know is refused, not served approximately.
SERVED_KWARGS = ("scaling", "sliding_window", "softcap", "s_aux")
NEUTRAL_KWARGS = ("dropout", "position_ids", "use_cache", "cache_position", "output_attentions",
                  "output_router_logits", "is_causal", "layer_idx")


@dataclass(frozen=True)
class Visibility:
    """What one attention call adds to plain causal attention (partial_attn's window, softcap and sinks)."""

    window: int = -1
    softcap: float = 0.0
    sinks: Optional[torch.Tensor] = None  # fp32 [Hq]

    @property
    def plain(self) -> bool:
        return self.window < 0 and self.softcap == 0.0 and self.sinks is None


def visibility(module, kwargs) -> Visibility:
    """The window, cap and sinks of one attention call, from the keywords the module passed (checked)."""
    unknown = sorted(k for k, v in kwargs.items() if k not in SERVED_KWARGS + NEUTRAL_KWARGS and v is not None)
    if unknown:
        raise NotImplementedError(f"{type(module).__name__}: semshare attention does not implement the "
                                  f"argument(s) {', '.join(unknown)} that this model's attention passes")
    if kwargs.get("dropout"):
        raise NotImplementedError(f"{type(module).__name__}: attention dropout {kwargs['dropout']} (eval mode only)")
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    return Visibility(int(window) if window else -1, float(softcap) if softcap else 0.0,
                      None if sinks is None else sinks.detach().float())


def semshare_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """AttentionInterface function: partial_attn over the active SemShareCache layer, else the model's own eager
    attention."""
    cache = _ACTIVE_CACHE.get()
    if cache is None or key.dim() != 3:
        return _previous_attention(module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    vis = visibility(module, kwargs)
    layer = cache.layers[module.layer_idx]
    layer.window = vis.window  # for the engine's self-check against the config's windows
    q_pos = layer.step_positions  # self-attention: the queries are the tokens this step just wrote
    q = query[0].transpose(0, 1)  # [n, Hq, D]
    kv_pos = layer.kv_pos[: layer.used]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    observe = max(cache.observe, cache.retain_observe) if layer.write_positions is not None else 0
    attn = functools.partial(ops.partial_attn, scale=scale, window=vis.window, softcap=vis.softcap, sinks=vis.sinks)
    if layer.causal_step and vis.plain and query.device.type in CAUSAL_SDPA_DEVICE_TYPES:
        out = _causal_sdpa(query, key, value, scale)
        if observe:  # the observer's softmax normaliser, from its few queries only
            lse = attn(q[-observe:], key, value, q_pos[-observe:], kv_pos)[1]
    else:
        out, lse = attn(q, key, value, q_pos, kv_pos)
        lse = lse[-observe:] if observe else None
    if observe:
        received = _attention_received(q[-observe:], key, q_pos[-observe:], kv_pos, lse, scale, vis)
        if cache.observe:
            layer.scores = received[-cache.observe:].sum(0)
        if cache.retain_observe:
            layer.retain_scores = received[-cache.retain_observe:].sum(0)
    return out.unsqueeze(0), None  # [1, n, Hq, Dv], as HF attention functions return


def previous_implementation(config) -> str:
    return _PREVIOUS_ATTENTION.get(id(config), "sdpa")


def _previous_attention(module):
    """The attention function the model used before it was switched to "semshare"."""
    name = previous_implementation(module.config)
    if name == "eager":  # not in the registry: each modeling file has its own (soft-capping, sinks, ...)
        fn = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def semshare_mask(*args, config=None, **kwargs):
    """AttentionMaskInterface function: no mask inside a semshare cache (partial_attn knows every slot's position),
    else the mask of the model's previous attention."""
    if _ACTIVE_CACHE.get() is not None:
        return None
    windows = _MASK_WINDOWS.get()
    if windows is not None:
        windows.append(mask_window(kwargs.get("mask_function")))
    return ALL_MASK_ATTENTION_FUNCTIONS[previous_implementation(config)](*args, config=config, **kwargs)


# The windows of the masks the model's own forward builds, while `watching_mask_windows` collects them.
_MASK_WINDOWS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("semshare_mask_windows", default=None)
UNKNOWN_WINDOW = "unknown"


@contextlib.contextmanager
def watching_mask_windows() -> Iterator[list]:
    """Collect `mask_window` of every mask the model's own forward builds inside (outside a semshare cache).

    A window that an attention call passes is applied by the engine; the model's own SDPA or eager attention
    ignores that keyword and applies only its mask. The two agree only when some mask of the forward windows the
    same, which the engine's self-check asks, since its short prompt cannot show a window in the logits."""
    windows: list = []
    token = _MASK_WINDOWS.set(windows)
    try:
        yield windows
    finally:
        _MASK_WINDOWS.reset(token)


def mask_window(mask_function, far: int = 1 << 40):
    """The sliding window of a transformers mask function (batch, head, q_idx, kv_idx) -> visible: w where query q
    sees keys q - w < k <= q, None where it sees every earlier key, UNKNOWN_WINDOW where it is neither (or cannot
    be called on plain positions). Read at distant query positions, one just before a large power of two and two
    neighbours just past half of it (a chunked mask shows neighbouring queries different spans, whatever its chunk
    size), by bisecting for the first key seen."""
    def sees(q: int, k: int) -> bool:
        zero = torch.tensor(0)
        return bool(mask_function(zero, zero, torch.tensor(q), torch.tensor(k)))

    try:
        found = set()
        for q in (far - 1, far // 2, far // 2 + 1):
            if not sees(q, q) or sees(q, q + 1):
                return UNKNOWN_WINDOW
            lo, hi = 0, q  # the first key seen lies in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if sees(q, mid) else (mid + 1, hi)
            if lo > 0 and sees(q, lo - 1):
                return UNKNOWN_WINDOW
            found.add(None if lo == 0 else q - lo + 1)
    except Exception:  # a mask that reads tensors of the real sequence (padding, packing) at far positions
        return UNKNOWN_WINDOW
    return found.pop() if len(found) == 1 else UNKNOWN_WINDOW


def _causal_sdpa(query, key, value, scale) -> torch.Tensor:
    """Causal attention of query [1, Hq, n, D] over token-major key/value [n, Hkv, D]; returns [n, Hq, Dv]."""
    k, v = key.transpose(0, 1)[None], value.transpose(0, 1)[None]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale,
                                                           enable_gqa=k.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)


def _attention_received(q, key, q_pos, kv_pos, lse, scale, vis: Visibility) -> torch.Tensor:
    """Each given query's softmax weights on each key slot, summed over its heads ([queries, slots] fp32), with the
    visibility and logits of the attention itself (window, cap; a sink's share goes to no slot)."""
    group = q.shape[1] // key.shape[1]
    logits = torch.einsum("qhd,khd->qhk", q.float(), key.float().repeat_interleave(group, dim=1)) * scale
    if vis.softcap > 0:
        logits = vis.softcap * torch.tanh(logits / vis.softcap)
    weights = torch.exp(logits - lse[..., None])
    visible = (kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
    if vis.window > 0:
        visible &= kv_pos[None, :] > q_pos[:, None] - vis.window
    return (weights * visible[:, None, :]).sum(1)


def use_semshare_attention(model) -> None:
    """Register the "semshare" attention (and its mask function) and switch the model to it (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, semshare_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, semshare_mask)
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        for key in configs:
            _PREVIOUS_ATTENTION[key] = previous
        model.set_attn_implementation(ATTENTION_NAME)
