"""Lane-level numpy model of partial_attn_mma_kernel (csrc/cuda/partial_attn.cu), for sessions without a GPU.

mma.sync.m16n8k16 is modelled from PTX's fragment tables (which lane holds which element of A, B and C/D); the
kernel's own index expressions (Q fragments, the padded K and transposed V tiles in shared memory, the online
softmax on accumulator fragments, P re-packed as the A operand) are transliterated statement by statement, with
the shared-memory padding poisoned with NaN so that a read of it shows. Run after changing the kernel's indexing:

    python tools/mma_attn_model.py      # a few shapes (GQA 3 and 4, MHA, kv_pos, ragged), ~1 min on CPU

It checks index algebra only: a model can drift from the kernel, and only the CUDA tests on a GPU check the
kernel itself (python_tests -k cuda).
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_tests"))
from test_partial_attn import sdpa_reference  # noqa: E402  (float64 SDPA with an explicit mask)

PAD, KEYS, WARPS = 8, 64, 4
LANES = np.arange(32); GRP = LANES // 4; TIG = LANES % 4

def rnd(x, dt):  # round to the input type (bf16)
    return torch.tensor(np.asarray(x, dtype=np.float32)).to(dt).float().numpy()

def mma(d, a, b0, b1):
    """d[32,4] += A B. a[32,4,2], b0/b1[32,2]: (lo, hi) halves of each 32-bit register, per PTX tables."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for ln in range(32):
        g, t = ln // 4, ln % 4
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[ln, i // 2, i % 2]
        for i in range(4):
            B[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = (b0 if i < 2 else b1)[ln, i % 2]
    D = A @ B
    for ln in range(32):
        g, t = ln // 4, ln % 4
        for i in range(4):
            d[ln, i] += D[g if i < 2 else g + 8, 2 * t + (i & 1)]

def pair(arr, idx):  # a 32-bit load of two consecutive halves at idx (per lane)
    return np.stack([arr[idx], arr[idx + 1]], -1)

def kernel(q, k, v, q_pos, kv_pos, cu_k, order, tiles, G, scale, dt):
    nq_all, Hq, D = q.shape; out = np.full((nq_all, Hq, D), np.nan); lse = np.full((nq_all, Hq), np.nan)
    KS, VS, CH = D + PAD, KEYS + PAD, D // 8
    for (b, t0, t1) in tiles:
        for kvh in range(k.shape[1]):
            nq = t1 - t0
            q_max = q_pos[order[t1 - 1]]; k0, k1 = cu_k[b], cu_k[b + 1]
            k_end = k1 if kv_pos is not None else min(k1, k0 + max(q_max + 1, 0))
            W = {}
            for w in range(WARPS):
                rows = [w * 16 + GRP + 8 * r for r in range(2)]
                ri = [np.where(rw // G < nq, order[np.minimum(t0 + rw // G, t1 - 1)], -1) for rw in rows]
                rh = [kvh * G + rw % G for rw in rows]
                rp = [np.where(ri[r] >= 0, q_pos[np.maximum(ri[r], 0)], -1) for r in range(2)]
                qf = np.zeros((D // 16, 32, 4, 2))
                for kk in range(D // 16):
                    c = kk * 16 + 2 * TIG
                    for reg, (r, off) in enumerate([(0, 0), (1, 0), (0, 8), (1, 8)]):
                        for ln in range(32):
                            if ri[r][ln] >= 0:
                                qf[kk, ln, reg] = q[ri[r][ln], rh[r][ln], c[ln] + off: c[ln] + off + 2]
                W[w] = dict(ri=ri, rh=rh, rp=rp, qf=qf, o=np.zeros((D // 8, 32, 4)),
                            m=[np.full(32, -np.inf)] * 2, l=[np.zeros(32)] * 2)
            for j0 in range(k0, k_end, KEYS):
                key_pos = np.array([(kv_pos[j] if kv_pos is not None else j - k0) if j < k1 else -1
                                    for j in range(j0, j0 + KEYS)])
                if not ((key_pos >= 0) & (key_pos <= q_max)).any():
                    continue
                Ks = np.full(KEYS * KS, np.nan); Vt = np.full(D * VS, np.nan)  # pads stay NaN: must not be read
                for e in range(KEYS * CH):
                    j, c = e // CH, e % CH
                    Ks[j * KS + c * 8: j * KS + c * 8 + 8] = k[j0 + j, kvh, c * 8:c * 8 + 8] if j0 + j < k1 else 0
                for e in range(KEYS // 2 * CH):
                    jp, c = e % (KEYS // 2), e // (KEYS // 2); j = 2 * jp
                    x0 = v[j0 + j, kvh, c * 8:c * 8 + 8] if j0 + j < k1 else np.zeros(8)
                    x1 = v[j0 + j + 1, kvh, c * 8:c * 8 + 8] if j0 + j + 1 < k1 else np.zeros(8)
                    for d in range(8):
                        Vt[(c * 8 + d) * VS + j] = x0[d]; Vt[(c * 8 + d) * VS + j + 1] = x1[d]
                for w in range(WARPS):
                    S = W[w]
                    s = np.zeros((KEYS // 8, 32, 4))
                    for kk in range(D // 16):
                        for nt in range(KEYS // 8):
                            kr = (nt * 8 + GRP) * KS + kk * 16 + 2 * TIG
                            mma(s[nt], S['qf'][kk], pair(Ks, kr), pair(Ks, kr + 8))
                    tmax = [np.full(32, -np.inf), np.full(32, -np.inf)]
                    for nt in range(KEYS // 8):
                        for e in range(4):
                            p = key_pos[nt * 8 + 2 * TIG + (e & 1)]
                            vis = (p >= 0) & (p <= S['rp'][e // 2])
                            s[nt][:, e] = np.where(vis, s[nt][:, e] * scale * math.log2(math.e), -np.inf)
                            tmax[e // 2] = np.maximum(tmax[e // 2], s[nt][:, e])
                    m_use = [None, None]
                    for r in range(2):
                        tm = tmax[r]
                        tm = np.maximum(tm, tm[LANES ^ 1]); tm = np.maximum(tm, tm[LANES ^ 2])
                        m_new = np.maximum(S['m'][r], tm)
                        m_use[r] = np.where(m_new == -np.inf, 0, m_new)
                        alpha = np.exp2(S['m'][r] - m_use[r])
                        S['m'][r] = m_new; S['l'][r] = S['l'][r] * alpha
                        S['o'][:, :, 2 * r] *= alpha; S['o'][:, :, 2 * r + 1] *= alpha
                    for nt in range(KEYS // 8):
                        for e in range(4):
                            s[nt][:, e] = np.exp2(s[nt][:, e] - m_use[e // 2]); S['l'][e // 2] = S['l'][e // 2] + s[nt][:, e]
                    for kk in range(KEYS // 16):
                        pa = np.stack([rnd(np.stack([s[2 * kk][:, 0], s[2 * kk][:, 1]], -1), dt),
                                       rnd(np.stack([s[2 * kk][:, 2], s[2 * kk][:, 3]], -1), dt),
                                       rnd(np.stack([s[2 * kk + 1][:, 0], s[2 * kk + 1][:, 1]], -1), dt),
                                       rnd(np.stack([s[2 * kk + 1][:, 2], s[2 * kk + 1][:, 3]], -1), dt)], 1)
                        for dn in range(D // 8):
                            vr = (dn * 8 + GRP) * VS + kk * 16 + 2 * TIG
                            mma(S['o'][dn], pa, pair(Vt, vr), pair(Vt, vr + 8))
            for w in range(WARPS):
                S = W[w]
                for r in range(2):
                    l = S['l'][r]; l = l + l[LANES ^ 1]; l = l + l[LANES ^ 2]
                    for ln in range(32):
                        i = S['ri'][r][ln]
                        if i < 0: continue
                        inv = 1 / l[ln] if l[ln] > 0 else 0
                        h = S['rh'][r][ln]
                        for dn in range(D // 8):
                            out[i, h, dn * 8 + 2 * TIG[ln]: dn * 8 + 2 * TIG[ln] + 2] = S['o'][dn][ln, 2 * r: 2 * r + 2] * inv
                        if TIG[ln] == 0:
                            lse[i, h] = (S['m'][r][ln] + math.log2(l[ln])) * math.log(2) if l[ln] > 0 else -np.inf
    return out, lse

def tile_queries(q_pos, cu_q, tile_q):
    B = len(cu_q) - 1
    seq = np.repeat(np.arange(B), np.diff(cu_q))
    by_pos = np.argsort(q_pos, kind='stable'); order = by_pos[np.argsort(seq[by_pos], kind='stable')]
    tiles = [(b, t, min(t + tile_q, cu_q[b + 1])) for b in range(B) for t in range(cu_q[b], cu_q[b + 1], tile_q)]
    return order, tiles

def check(nq, nk, Hq, Hk, D, with_kv_pos, seed, dt=torch.bfloat16, batch=None, causal=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, Hq, D, generator=g).to(dt); k = torch.randn(nk, Hk, D, generator=g).to(dt); v = torch.randn(nk, Hk, D, generator=g).to(dt)
    cu_q, cu_k = (np.array([0, nq]), np.array([0, nk])) if batch is None else batch
    q_pos = torch.arange(nq) if causal else torch.randint(0, nk + 3, (nq,), generator=g)
    kv = None
    if with_kv_pos:
        kv = torch.randperm(nk + 5, generator=g)[:nk]; kv[torch.rand(nk, generator=g) < 0.2] = -1
    G = Hq // Hk; scale = 1 / math.sqrt(D)
    order, tiles = tile_queries(q_pos.numpy(), cu_q, 64 // G)
    out, lse = kernel(q.float().numpy(), k.float().numpy(), v.float().numpy(), q_pos.numpy(), None if kv is None else kv.numpy(),
                      cu_k, order, tiles, G, scale, dt)
    ref_o, ref_l = sdpa_reference(q, k, v, q_pos, kv, None if batch is None else torch.tensor(cu_q), None if batch is None else torch.tensor(cu_k))
    assert not np.isnan(out).any() and not np.isnan(lse).any(), "unwritten outputs"
    dead = torch.isneginf(ref_l)
    assert (np.isneginf(lse) == dead.numpy()).all()
    eo = np.abs(out - ref_o.numpy()).max(); el = np.abs(lse[~dead.numpy()] - ref_l[~dead].numpy()).max()
    print(f"nq={nq} nk={nk} Hq={Hq} Hk={Hk} D={D} kv_pos={with_kv_pos}: max|out err| {eo:.2e}  max|lse err| {el:.2e}  dead {int(dead.sum())}")
    assert eo < 3e-2 and el < 2e-4

if __name__ == "__main__":
    check(7, 70, 9, 3, 64, False, 1)
    check(5, 130, 8, 2, 128, True, 2)
    check(20, 100, 4, 4, 64, True, 3)
    check(9, 65, 6, 2, 64, True, 4, batch=(np.array([0, 3, 3, 9]), np.array([0, 20, 40, 65])))
    check(50, 200, 8, 2, 128, False, 5)  # 4 query tiles, keys clipped at the tile's last position
    check(150, 150, 3, 3, 64, False, 6, causal=True)  # causal prefill: 3 tiles, diagonal and skipped tiles
