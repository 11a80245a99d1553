"""The ops of docs/contract.md section 3 in plain torch: the contract in code.

Written for clarity, not speed (partial_attn materialises the score matrix). The kernels are tested against
these functions; where the two disagree, docs/contract.md decides. Arguments are assumed valid: argument checking is
the kernels' job.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    bits = planes.shape[1]
    words = math.ceil(bits / 64)
    set_bits = (x.float() @ planes) >= 0  # [..., B]
    set_bits = torch.nn.functional.pad(set_bits, (0, words * 64 - bits)).view(*x.shape[:-1], words, 64)
    weights = torch.ones(64, dtype=torch.int64, device=x.device) << torch.arange(64, device=x.device)
    # The bits are disjoint, so the sum is their OR; bit 63 wraps to the sign as two's complement should.
    return (set_bits.long() * weights).sum(-1)


def hamming_distance(q_codes: torch.Tensor, k_codes: torch.Tensor) -> torch.Tensor:
    """[Nq, Nk] int64 Hamming distances between packed codes."""
    diff = q_codes[:, None, :] ^ k_codes[None, :, :]  # [Nq, Nk, W]
    dist = torch.zeros(diff.shape[:2], dtype=torch.int64, device=diff.device)
    for bit in range(64):  # one bit position at a time keeps memory at [Nq, Nk, W]
        dist += ((diff >> bit) & 1).sum(-1)
    return dist


def hamming_topk(q_codes: torch.Tensor, k_codes: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    dist = hamming_distance(q_codes, k_codes)
    nk = k_codes.shape[0]
    # Distance first, reference index second: one integer key makes the tie rule explicit.
    order = torch.argsort(dist * nk + torch.arange(nk, device=dist.device), dim=1)[:, :k]
    return dist.gather(1, order).to(torch.int32), order


def rotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, neox: bool = True) -> torch.Tensor:
    """R(delta) k for keys k [..., P, H, D] and deltas [P], computed in fp32 and rounded once to k's dtype."""
    half = inv_freq.shape[0]
    rot = 2 * half
    angle = delta.float()[:, None] * inv_freq[None, :]  # [P, half], fp32
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # broadcast over heads
    kf = k.float()
    if neox:
        x1, x2 = kf[..., :half], kf[..., half:rot]
    else:
        x1, x2 = kf[..., 0:rot:2], kf[..., 1:rot:2]
    r1 = (x1 * cos - x2 * sin).to(k.dtype)
    r2 = (x2 * cos + x1 * sin).to(k.dtype)
    out = k.clone()
    if neox:
        out[..., :half], out[..., half:rot] = r1, r2
    else:
        out[..., 0:rot:2], out[..., 1:rot:2] = r1, r2
    # delta == 0 is a bit-exact copy, -0.0 included.
    return torch.where((delta == 0)[:, None, None], k, out)


def rope_reuse_(k_dst: torch.Tensor, v_dst: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                src_idx: torch.Tensor, dst_idx: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor,
                neox: bool = True) -> None:
    keep = (src_idx >= 0) & (dst_idx >= 0)
    src, dst, dl = src_idx[keep], dst_idx[keep], delta[keep]
    tok = k_dst.dim() - 3  # token dim: 0 for [T, H, D], 1 for [L, T, H, D]
    k_dst.index_copy_(tok, dst, rotate(k_src.index_select(tok, src), dl, inv_freq, neox))
    v_dst.index_copy_(tok, dst, v_src.index_select(tok, src))


def visible_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int = -1) -> torch.Tensor:
    """[Nq, Nk] bool: key j is visible to query i iff 0 <= kv_pos[j] <= q_pos[i] (and, with a window > 0,
    q_pos[i] - window < kv_pos[j])."""
    visible = (kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
    if window > 0:
        visible &= kv_pos[None, :] > q_pos[:, None] - window
    return visible


def partial_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 kv_pos: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                 cu_seqlens_k: Optional[torch.Tensor] = None, scale: Optional[float] = None, window: int = -1,
                 softcap: float = 0.0, sinks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu_q = [0, nq] if cu_seqlens_q is None else cu_seqlens_q.tolist()
    cu_k = [0, nk] if cu_seqlens_k is None else cu_seqlens_k.tolist()
    out = q.new_zeros(nq, hq, v.shape[2])
    lse = torch.full((nq, hq), -math.inf, dtype=torch.float32, device=q.device)
    if sinks is not None:  # a query that sees no key still has the sink in its denominator
        lse[:] = sinks.float()[None, :]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start:
            continue
        pos_k = torch.arange(ks.stop - ks.start, device=q.device) if kv_pos is None else kv_pos[ks]
        visible = visible_mask(q_pos[qs], pos_k, window)  # [nq_b, nk_b]
        kb = k[ks].float().repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        vb = v[ks].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs].float(), kb) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible, -math.inf)
        if sinks is not None:  # one more logit per head: in the denominator, not in the output
            sink = sinks.float()[:, None, None].expand(hq, scores.shape[1], 1)
            scores = torch.cat([scores, sink], dim=-1)
        lse_b = torch.logsumexp(scores, dim=-1)  # [hq, nq_b]; -inf where nothing is visible
        # Rows with no visible key (lse -inf): 0 (exp(-inf - -inf) is NaN). A NaN logit stays NaN; a sink of +inf
        # takes all the weight (exp(s - inf) = 0).
        probs = torch.where(torch.isneginf(lse_b)[..., None], 0.0, torch.exp(scores - lse_b[..., None]))
        if sinks is not None:
            probs = probs[..., :-1]
        out[qs] = torch.einsum("hqk,khe->qhe", probs, vb).to(q.dtype)
        lse[qs] = lse_b.transpose(0, 1)
    return out, lse
