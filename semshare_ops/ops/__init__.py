"""Typed wrappers of the `torch.ops.semshare` ops (their fake kernels for torch.compile / export: `fake`).

The kernels live in csrc/ (C++ on CPU, CUDA on GPU); the contract is docs/contract.md section 3 and
`semshare_ops.ops.oracle` is the same contract in plain torch. Shapes below: T tokens, H heads, D head dim,
L layers, P pairs, W = ceil(bits / 64) code words.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .. import _C  # loads the library: schemas and CPU/CUDA kernels register on import
from . import fake  # noqa: F401  (the fake kernels, for torch.compile / export and meta tensors, register on import)

__all__ = ["simhash", "hamming_topk", "rope_reuse_", "partial_attn"]


def check_torch_version(built: str, running: str) -> None:
    """ImportError unless the torch the kernels were compiled against (`built`, e.g. "2.13.0") and the one running
    (`running`, e.g. "2.13.0+cpu") are the same release (major.minor; a patch or local build tag may differ): a
    C++ extension has no ABI guarantee across torch releases, and one that loads may still run wrong."""
    def release(version: str) -> tuple:
        return tuple(version.split("+")[0].split(".")[:2])

    if release(built) != release(running):
        raise ImportError(
            f"semshare_ops: its kernels were compiled against torch {built}, but torch {running} is installed; a "
            f"C++ extension only runs under the torch release it was built for. Rebuild it against this torch "
            f"(`pip install --no-build-isolation .` in the source tree) or install torch {'.'.join(release(built))}.")


# A library built before it recorded its torch (an old in-place build) is taken as it is: nothing to compare with.
if hasattr(_C, "TORCH_VERSION"):
    check_torch_version(_C.TORCH_VERSION, torch.__version__)


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash codes: bit b of a row is 1 iff dot(x_row, planes[:, b]) >= 0 (fp32 accumulation).

    x [..., D] (fp32/fp16/bf16), planes [D, B] fp32 -> int64 [..., W]; bit b in word b // 64 at position b % 64
    (least significant first); unused high bits of the last word are 0.
    """
    return torch.ops.semshare.simhash.default(x, planes)


def hamming_topk(q_codes: torch.Tensor, k_codes: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k reference codes nearest to each query code by Hamming distance.

    q_codes [Nq, W], k_codes [Nk, W] int64 -> (dist int32 [Nq, k], idx int64 [Nq, k]), ascending by distance,
    ties broken by the smaller reference index; 1 <= k <= Nk.
    """
    _check_number("k", k, int)
    return torch.ops.semshare.hamming_topk.default(q_codes, k_codes, k)


def rope_reuse_(k_dst: torch.Tensor, v_dst: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                src_idx: torch.Tensor, dst_idx: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor,
                neox: bool = True) -> None:
    """In place: v_dst[dst_idx[p]] = v_src[src_idx[p]], k_dst[dst_idx[p]] = R(delta[p]) k_src[src_idx[p]].

    Caches are token-major [T, H, D] or [L, T, H, D] (every layer in one launch); v may have its own head dim.
    src_idx, dst_idx, delta int64 [P]; a negative src_idx or dst_idx skips the pair; non-negative dst_idx
    entries must be unique. R rotates the first 2 * len(inv_freq) dims by delta * inv_freq (fp32); neox pairs
    (i, i + rotary_dim / 2) as HF rotate_half, else (2i, 2i + 1). delta == 0 copies bit for bit.
    """
    if not isinstance(neox, bool):  # the schema's `bool neox` takes None as False: the other convention, silently
        raise TypeError(f"neox: expected a bool, got {type(neox).__name__} {neox!r}")
    torch.ops.semshare.rope_reuse_.default(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox)


def partial_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 kv_pos: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                 cu_seqlens_k: Optional[torch.Tensor] = None, scale: Optional[float] = None, window: int = -1,
                 softcap: float = 0.0, sinks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact attention for any set of query positions against a full or compressed KV cache.

    q [Nq, Hq, D], k [Nk, Hkv, D], v [Nk, Hkv, Dv] (Hq % Hkv == 0, GQA); q_pos int64 [Nq]; kv_pos int64 [Nk]
    (default 0..n-1 within each sequence; negative = empty slot). Key j is visible to query i iff
    0 <= kv_pos[j] <= q_pos[i] (and, with cu_seqlens_q/cu_seqlens_k [B + 1], j is in i's sequence; with
    window > 0, also q_pos[i] - window < kv_pos[j], HF's sliding window). softcap > 0 turns each logit
    s = scale * q.k into softcap * tanh(s / softcap) (Gemma-2). sinks fp32 [Hq]: one extra logit per head in the
    softmax denominator that adds nothing to the output (gpt-oss).
    Returns out [Nq, Hq, Dv] in q's dtype and lse [Nq, Hq] fp32 (natural log, of the capped logits, sink
    included); no visible key: out 0 and lse -inf (the sink's logit with sinks).
    """
    if scale is not None:
        _check_number("scale", scale, float)
    _check_number("window", window, int)
    _check_number("softcap", softcap, float)
    return torch.ops.semshare.partial_attn.default(q, k, v, q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, scale, window,
                                                   softcap, sinks)


def _check_number(name: str, value, kind: type) -> None:
    """The schemas' `int` and `float` take a bool as 0 / 1 (window=True ran as a one-position window): refused
    here, as everywhere else in the package; an int is a float's value too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
        raise TypeError(f"{name}: expected {'an int' if kind is int else 'a number'}, got {type(value).__name__} "
                        f"{value!r}")
