"""Hugging Face transformers shims: a token-major KV cache and an attention function that runs partial_attn.

The model's own decoder layers do all the work (norms, projections, RoPE, MLP); these shims only decide where
K/V go and which keys each query sees:
- `TokenMajorLayer` keeps one layer's K/V as `[slots, H, D]` with an explicit position per slot (`kv_pos`, -1 for
  an empty slot), so a cache assembled from another prompt, recomputed at arbitrary positions or compacted, is
  still exact under `partial_attn`.
- `semshare_attention` is registered in transformers' `AttentionInterface` as "semshare". With a `SemShareCache`
  active it calls `partial_attn` with the queries' positions; otherwise it behaves as SDPA, so a model switched
  to it keeps working with HF's own caches. A step whose queries are every position 0..n-1 of a cache holding
  exactly those positions (a full prefill, a check layer of reuse) is plain causal attention: on the device types
  in `CAUSAL_SDPA_DEVICE_TYPES` it goes to SDPA's causal kernel instead. That is CUDA only, where SDPA's flash
  backend is the tuned kernel to beat; on CPU `partial_attn` measured 129 GFLOP/s against SDPA's 118 (fp32, 2
  cores, causal 4096 tokens) and keeps the step.
Batch size 1: one request is one sequence.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops

ATTENTION_NAME = "semshare"
CAUSAL_SDPA_DEVICE_TYPES = ("cuda",)  # where whole-cache causal steps go to SDPA (see the module docstring)
_ACTIVE_CACHE: contextvars.ContextVar[Optional["SemShareCache"]] = contextvars.ContextVar("semshare_cache",
                                                                                         default=None)


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
        self.in_order = True  # slot i holds position i for every live slot (no compaction, no gap)
        self.causal_step = False  # the last update wrote every position 0..used-1: plain causal attention
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
        self.observe = 0  # > 0: record the attention the last `observe` queries of a recompute step pay

    @classmethod
    def allocate(cls, num_layers: int, capacity: int, heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, device, used: int = 0) -> "SemShareCache":
        """Layers that are views of one [L, capacity, H, D] K and V allocation (what rope_reuse_ fills at once)."""
        keys = torch.zeros(num_layers, capacity, heads, head_dim, dtype=dtype, device=device)
        values = torch.zeros(num_layers, capacity, heads, v_head_dim, dtype=dtype, device=device)
        return cls([TokenMajorLayer(keys[i], values[i], used) for i in range(num_layers)], keys, values)

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


def semshare_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: partial_attn over the active SemShareCache layer, else SDPA."""
    cache = _ACTIVE_CACHE.get()
    if cache is None or key.dim() != 3:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = cache.layers[module.layer_idx]
    q_pos = kwargs["position_ids"][0]
    q = query[0].transpose(0, 1)  # [n, Hq, D]
    kv_pos = layer.kv_pos[: layer.used]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    observe = cache.observe if layer.write_positions is not None else 0
    if layer.causal_step and query.device.type in CAUSAL_SDPA_DEVICE_TYPES:
        out = _causal_sdpa(query, key, value, scale)
        if observe:  # the observer's softmax normaliser, from its few queries only
            lse = ops.partial_attn(q[-observe:], key, value, q_pos[-observe:], kv_pos, scale=scale)[1]
    else:
        out, lse = ops.partial_attn(q, key, value, q_pos, kv_pos, scale=scale)
        lse = lse[-observe:] if observe else None
    if observe:
        layer.scores = _attention_received(q[-observe:], key, q_pos[-observe:], kv_pos, lse, scale)
    return out.unsqueeze(0), None  # [1, n, Hq, Dv], as HF attention functions return


def _causal_sdpa(query, key, value, scale) -> torch.Tensor:
    """Causal attention of query [1, Hq, n, D] over token-major key/value [n, Hkv, D]; returns [n, Hq, Dv]."""
    k, v = key.transpose(0, 1)[None], value.transpose(0, 1)[None]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale,
                                                           enable_gqa=k.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)


def _attention_received(q, key, q_pos, kv_pos, lse, scale) -> torch.Tensor:
    """Sum over the given queries and heads of their softmax weights on each key slot ([slots] fp32)."""
    group = q.shape[1] // key.shape[1]
    logits = torch.einsum("qhd,khd->qhk", q.float(), key.float().repeat_interleave(group, dim=1)) * scale
    weights = torch.exp(logits - lse[..., None])
    visible = (kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
    return (weights * visible[:, None, :]).sum((0, 1))


def use_semshare_attention(model) -> None:
    """Register the "semshare" attention and switch the model to it (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, semshare_attention)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
