"""Fake kernels of the `torch.ops.semshare` ops: output metadata for torch.compile, export and meta tensors, after
the same checks the real kernels make (csrc/checks.h) wherever metadata decides them.

So a bad call fails where it is traced, naming the argument as the kernels do, instead of compiling and failing at its
first run; and a meta tensor mixed with real ones, which reaches these and not a real kernel, is refused instead of
returning as if the call had done its work. What only values or addresses decide stays with the real kernels, which
every compiled graph still calls: index ranges and duplicates (`rope_reuse_`), the `cu_seqlens` boundaries
(`partial_attn`), and inputs that share memory with an output where fake tensors cannot tell (symbolic sizes, two
storages over one buffer). tests/ops checks each op's bad-argument cases here too.

The conditions go through `torch._check`, so under dynamic shapes a size the checks compare becomes a guard or a
runtime assertion, not a specialisation.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import torch

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_check = torch._check


def _same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None:
            _check(t.device == ref.device,
                   lambda: f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def _dim(t: torch.Tensor, dim: int, name: str) -> None:
    _check(t.dim() == dim, lambda: f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def _dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    _check(t.dtype == dtype, lambda: f"{name}: expected {dtype}, got {t.dtype}")


def _size(t: torch.Tensor, dim: int, expected, name: str, what: str) -> None:
    _check(t.shape[dim] == expected,
           lambda: f"{name}: expected size {expected} at dim {dim} ({what}), got {tuple(t.shape)}")


def _activation(t: torch.Tensor, name: str) -> None:
    _check(t.dtype in ACTIVATION_DTYPES, lambda: f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    _check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
           lambda: f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


OFFSETS_LISTED = 1 << 20  # csrc/checks.h kOffsetsListed


def _internal_overlap(sizes, strides) -> str | None:
    """csrc/checks.h internal_overlap on concrete sizes: "yes", "too_hard" or None (no overlap)."""
    dims = sorted((abs(stride), size) for size, stride in zip(sizes, strides) if size != 1)
    if math.prod(sizes) <= 1:
        return None
    if any(stride == 0 for stride, _ in dims):
        return "yes"
    span = 0
    for stride, size in dims:
        if stride <= span:
            break
        span += stride * (size - 1)
    else:
        return None
    if math.prod(sizes) > OFFSETS_LISTED:
        return "too_hard"
    offsets = np.zeros(1, dtype=np.int64)  # numpy: torch calls here would make fake tensors under the fake mode
    for stride, size in dims:
        offsets = (offsets[None, :] + stride * np.arange(size, dtype=np.int64)[:, None]).reshape(-1)
    return "yes" if np.unique(offsets).size < offsets.size else None


def _one_address_per_element(t: torch.Tensor, name: str) -> None:
    """The kernels' test of an output (csrc/checks.h check_one_address_per_element): a stride-0 dimension of size
    > 1 for any sizes; with concrete sizes also the rest, rows that overlap or interleave. Under symbolic sizes that
    part is left to the real kernel, which the compiled graph calls."""
    sizes, strides = tuple(t.shape), t.stride()

    def shared():
        return (f"{name}: some of its elements share memory (an expanded view?); an output needs one address per "
                f"element, got strides {strides} for shape {sizes}")

    # An empty output has no element to share, whatever its strides (the kernels' test starts there too).
    empty = any(size == 0 for size in sizes)
    _check(empty or not any(stride == 0 and size > 1 for size, stride in zip(sizes, strides)), shared)
    if not all(type(x) is int for x in sizes + strides):
        return
    overlap = _internal_overlap(sizes, strides)
    _check(overlap != "yes", shared)
    _check(overlap != "too_hard",
           lambda: f"{name}: its dimensions interleave in memory (strides {strides} for shape {sizes}), and whether "
                   f"two of its {math.prod(sizes)} elements share an address is only checked up to {OFFSETS_LISTED} "
                   f"elements; an output needs one address per element: pass a view whose strides nest (each larger "
                   f"than the span of the smaller ones), such as a contiguous tensor")


def _may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """csrc/checks.h may_share_memory on fake tensors: the byte ranges two views span in one storage intersect.
    Fake tensors keep the aliasing of the tensors they stand for (views of one base share one fake storage), so a
    traced call sees what the kernels would. Under symbolic sizes or offsets it says no and the real kernel, which
    the compiled graph calls, decides."""
    if a.device != b.device or a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False
    meta = (*a.shape, *a.stride(), a.storage_offset(), *b.shape, *b.stride(), b.storage_offset())
    if not all(type(x) is int for x in meta) or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.storage_offset() * t.element_size()
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return lo, lo + (last + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = span(a), span(b)
    return a_lo < b_hi and b_lo < a_hi


def _fp32_positive(x: float) -> bool:
    """Positive and finite as a double and after rounding to fp32, where the kernels use it (csrc/checks.h)."""
    if not (math.isfinite(x) and x > 0.0):
        return False
    try:
        f = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # some Pythons refuse to pack what rounds to inf, others give inf
        return False
    return math.isfinite(f) and f > 0.0


@torch.library.register_fake("semshare::simhash")
def _simhash_fake(x, planes):
    _check(x.dim() >= 1, lambda: "x: expected at least 1 dimension, got a scalar")
    _check(x.shape[-1] > 0, lambda: f"x: expected at least one feature in the last dimension, got shape "
                                    f"{tuple(x.shape)}")
    _activation(x, "x")
    _dim(planes, 2, "planes")
    _dtype(planes, torch.float32, "planes")
    _same_device("x", x, planes=planes)
    _check(planes.shape[0] == x.shape[-1], lambda: f"planes: expected {x.shape[-1]} rows (the last dim of x), got "
                                                   f"shape {tuple(planes.shape)}")
    return x.new_empty((*x.shape[:-1], (planes.shape[1] + 63) // 64), dtype=torch.int64)


MAX_CODE_WORDS = 16  # csrc/checks.h kMaxCodeWords


@torch.library.register_fake("semshare::hamming_topk")
def _hamming_topk_fake(q_codes, k_codes, k):
    _dim(q_codes, 2, "q_codes")
    _dim(k_codes, 2, "k_codes")
    _dtype(q_codes, torch.int64, "q_codes")
    _dtype(k_codes, torch.int64, "k_codes")
    _same_device("q_codes", q_codes, k_codes=k_codes)
    _check(k_codes.shape[1] == q_codes.shape[1], lambda: f"k_codes: expected {q_codes.shape[1]} words per code (as "
                                                         f"q_codes), got shape {tuple(k_codes.shape)}")
    words = q_codes.shape[1]
    for ok in (words >= 1, words <= MAX_CODE_WORDS):  # two checks: each a guard of its own under dynamic shapes
        _check(ok, lambda: f"q_codes: expected 1 to {MAX_CODE_WORDS} words per code (up to {64 * MAX_CODE_WORDS} "
                           f"bits), got shape {tuple(q_codes.shape)}")
    for t, name in ((q_codes, "q_codes"), (k_codes, "k_codes")):
        _check(t.shape[1] <= 1 or t.stride(1) == 1, lambda: f"{name}: the last dimension must be contiguous")
    torch._check_value(1 <= k and k <= k_codes.shape[0],
                       lambda: f"k: expected 1 <= k <= {k_codes.shape[0]} (the number of reference codes), got {k}")
    n = q_codes.shape[0]
    return q_codes.new_empty((n, k), dtype=torch.int32), q_codes.new_empty((n, k), dtype=torch.int64)


@torch.library.register_fake("semshare::rope_reuse_")
def _rope_reuse_fake(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox=True):
    nd = k_dst.dim()
    _check(nd in (3, 4), lambda: f"k_dst: expected [T, H, D] or [L, T, H, D], got shape {tuple(k_dst.shape)}")
    for t, name in ((v_dst, "v_dst"), (k_src, "k_src"), (v_src, "v_src")):
        _dim(t, nd, name)
    _activation(k_dst, "k_dst")
    for t, name in ((v_dst, "v_dst"), (k_src, "k_src"), (v_src, "v_src")):
        _activation(t, name)
        _check(t.dtype == k_dst.dtype, lambda: f"{name}: expected dtype {k_dst.dtype} (as k_dst), got {t.dtype}")
    _same_device("k_dst", k_dst, v_dst=v_dst, k_src=k_src, v_src=v_src)
    o = nd - 3  # the token dim
    if nd == 4:
        for t, name in ((v_dst, "v_dst"), (k_src, "k_src"), (v_src, "v_src")):
            _size(t, 0, k_dst.shape[0], name, "layers, as k_dst")
    _size(v_dst, o, k_dst.shape[o], "v_dst", "tokens, as k_dst")
    _size(v_src, o, k_src.shape[o], "v_src", "tokens, as k_src")
    for t, name in ((v_dst, "v_dst"), (k_src, "k_src"), (v_src, "v_src")):
        _size(t, o + 1, k_dst.shape[o + 1], name, "heads, as k_dst")
    _size(k_src, o + 2, k_dst.shape[o + 2], "k_src", "head dim, as k_dst")
    _size(v_src, o + 2, v_dst.shape[o + 2], "v_src", "head dim, as v_dst")
    for t, name in ((src_idx, "src_idx"), (dst_idx, "dst_idx"), (delta, "delta")):
        _dim(t, 1, name)
        _dtype(t, torch.int64, name)
    _size(dst_idx, 0, src_idx.shape[0], "dst_idx", "pairs, as src_idx")
    _size(delta, 0, src_idx.shape[0], "delta", "pairs, as src_idx")
    _dim(inv_freq, 1, "inv_freq")
    _dtype(inv_freq, torch.float32, "inv_freq")
    _check(2 * inv_freq.shape[0] <= k_dst.shape[-1],
           lambda: f"inv_freq: rotary_dim = 2 * len(inv_freq) = {2 * inv_freq.shape[0]} exceeds the key head dim "
                   f"{k_dst.shape[-1]}")
    _same_device("k_dst", k_dst, src_idx=src_idx, dst_idx=dst_idx, delta=delta, inv_freq=inv_freq)
    _one_address_per_element(k_dst, "k_dst")
    _one_address_per_element(v_dst, "v_dst")
    # The kernels read and write in one pass (csrc/checks.h): eager refuses outputs that share memory with each
    # other or with an input, and so must a traced call, or the compiled graph's functionalised copy of k_dst would
    # serve what eager refuses.
    pairs = [(k_dst, v_dst, "k_dst", "v_dst"), (k_dst, k_src, "k_dst", "k_src"), (k_dst, v_src, "k_dst", "v_src"),
             (v_dst, k_src, "v_dst", "k_src"), (v_dst, v_src, "v_dst", "v_src")]
    for t, name in ((src_idx, "src_idx"), (dst_idx, "dst_idx"), (delta, "delta"), (inv_freq, "inv_freq")):
        pairs += [(t, k_dst, name, "k_dst"), (t, v_dst, name, "v_dst")]
    for a, b, an, bn in pairs:
        _check(not _may_share_memory(a, b), lambda: f"{an}: must not share memory with {bn}")
    return None


@torch.library.register_fake("semshare::partial_attn")
def _partial_attn_fake(q, k, v, q_pos, kv_pos=None, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, window=-1,
                       softcap=0.0, sinks=None):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _dim(t, 3, name)
    _activation(q, "q")
    for t, name in ((k, "k"), (v, "v")):
        _activation(t, name)
        _check(t.dtype == q.dtype, lambda: f"{name}: expected dtype {q.dtype} (as q), got {t.dtype}")
    _same_device("q", q, k=k, v=v)
    nq, q_heads, head_dim = q.shape
    nk, kv_heads = k.shape[0], k.shape[1]
    _check(head_dim > 0, lambda: "q: head dim must be positive")
    _check(q_heads > 0, lambda: f"q: expected at least one query head, got shape {tuple(q.shape)}")
    _size(k, 2, head_dim, "k", "head dim, as q")
    _size(v, 0, nk, "v", "keys, as k")
    _size(v, 1, kv_heads, "v", "kv heads, as k")
    _check(kv_heads > 0 and q_heads % kv_heads == 0,
           lambda: f"k: kv heads ({kv_heads}) must divide the query heads of q ({q_heads})")
    for t, name, n, what in ((q_pos, "q_pos", nq, "queries, as q"), (kv_pos, "kv_pos", nk, "keys, as k")):
        if t is not None:
            _dim(t, 1, name)
            _dtype(t, torch.int64, name)
            _same_device("q", q, **{name: t})
            _size(t, 0, n, name, what)
    _check((cu_seqlens_q is None) == (cu_seqlens_k is None),
           lambda: f"{'cu_seqlens_k' if cu_seqlens_q is not None else 'cu_seqlens_q'}: cu_seqlens_q and cu_seqlens_k "
                   f"must be given together")
    if cu_seqlens_q is not None:
        for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
            _dim(t, 1, name)
            _check(t.dtype in (torch.int32, torch.int64), lambda: f"{name}: expected int32 or int64, got {t.dtype}")
            _same_device("q", q, **{name: t})
            _check(t.shape[0] >= 2,
                   lambda: f"{name}: expected [B + 1] boundaries with B >= 1, got shape {tuple(t.shape)}")
        _check(cu_seqlens_k.shape[0] == cu_seqlens_q.shape[0],
               lambda: f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} entries (as cu_seqlens_q), got "
                       f"{cu_seqlens_k.shape[0]}")
    torch._check_value(scale is None or _fp32_positive(scale),
                       lambda: f"scale: expected a positive number within fp32's range, or None, got {scale}")
    torch._check_value(window == -1 or window > 0,
                       lambda: f"window: expected -1 (no sliding window) or a positive number of positions, got "
                               f"{window}")
    torch._check_value(softcap == 0.0 or _fp32_positive(softcap),
                       lambda: f"softcap: expected 0 (off) or a positive cap within fp32's range, got {softcap}")
    if sinks is not None:
        _dim(sinks, 1, "sinks")
        _dtype(sinks, torch.float32, "sinks")
        _same_device("q", q, sinks=sinks)
        _size(sinks, 0, q_heads, "sinks", "query heads, as q")
    out = q.new_empty((nq, q_heads, v.shape[2]))
    lse = q.new_empty((nq, q_heads), dtype=torch.float32)
    return out, lse
