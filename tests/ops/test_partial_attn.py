"""partial_attn (docs/contract.md 3.4) against torch SDPA in float64 with an explicit mask, and ops against reference."""

import math

import numpy as np
import pytest
import torch

import semshare_ops
import torch.nn.functional as F

from op_testutils import (
    CUDA,
    DTYPE_IDS,
    DTYPES,
    EmulatedCudaOps,
    assert_bits_equal,
    expect_arg_error,
    fake_call,
    impl_module,
    make_generator,
    randn,
    tol,
)


LSE_ATOL = 2e-4  # lse is fp32 from fp32 scores for every input dtype; values are O(10)


# ---- oracle -------------------------------------------------------------------------------------------------


def seq_bounds(nq, nk, cu_seqlens_q=None, cu_seqlens_k=None):
    """[(q_start, q_end, k_start, k_end)] per sequence."""
    if cu_seqlens_q is None:
        return [(0, nq, 0, nk)]
    cq, ck = cu_seqlens_q.cpu().tolist(), cu_seqlens_k.cpu().tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def oracle_mask(q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, nk, window=-1):
    """[Nq, Nk] bool: key j visible to query i iff both are in the same sequence, 0 <= kv_pos[j] <= q_pos[i] and,
    with window > 0, q_pos[i] - window < kv_pos[j] (kv_pos defaults to 0..n-1 within each sequence)."""
    q_pos = q_pos.cpu()
    nq = q_pos.shape[0]
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for qs, qe, ks, ke in seq_bounds(nq, nk, cu_seqlens_q, cu_seqlens_k):
        kp = torch.arange(ke - ks) if kv_pos is None else kv_pos.cpu()[ks:ke]
        qp = q_pos[qs:qe, None]
        m = (kp[None, :] >= 0) & (kp[None, :] <= qp)
        if window > 0:
            m &= kp[None, :] > qp - window
        mask[qs:qe, ks:ke] = m
    return mask


def sdpa_reference(q, k, v, q_pos, kv_pos=None, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, window=-1,
                   softcap=0.0, sinks=None):
    """float64 (out [Nq, Hq, Dv], lse [Nq, Hq]) under the boolean mask of `oracle_mask`; GQA by repeat_interleave
    of the kv heads. Without softcap and sinks: F.scaled_dot_product_attention with that mask. With either:
    explicit scores s = scale * q.k, capped to softcap * tanh(s / softcap), one more column per head holding the
    sink logit (not scaled) appended, softmax over the row, and the sink column dropped before P.V.
    Queries with no visible key: out 0, lse -inf (with sinks: the head's sink)."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    nq, hq, d = q64.shape
    nk, hkv, _ = k64.shape
    dv = v64.shape[-1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sink64 = None if sinks is None else sinks.detach().cpu().double()
    mask_all = oracle_mask(q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, nk, window)
    out = torch.zeros(nq, hq, dv, dtype=torch.float64)
    lse = torch.full((nq, hq), -math.inf, dtype=torch.float64)
    if sink64 is not None:  # also what a sequence without keys gets
        lse[:] = sink64[None, :]
    for qs, qe, ks, ke in seq_bounds(nq, nk, cu_seqlens_q, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue
        mask = mask_all[qs:qe, ks:ke]  # [nq_b, nk_b]
        qb = q64[qs:qe].transpose(0, 1)  # [Hq, nq_b, D]
        kb = k64[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, nk_b, D]
        vb = v64[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, nk_b, Dv]
        s = (qb @ kb.transpose(-1, -2)) * scale  # [Hq, nq_b, nk_b]
        if softcap == 0 and sinks is None:
            o = F.scaled_dot_product_attention(qb[None], kb[None], vb[None], attn_mask=mask, scale=scale)[0]
        else:
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if sink64 is not None:
                s = torch.cat([s, sink64[:, None, None].expand(hq, qe - qs, 1)], dim=-1)
                mask = torch.cat([mask, torch.ones(qe - qs, 1, dtype=torch.bool)], dim=1)  # the sink: always there
            p = torch.softmax(s.masked_fill(~mask[None], -math.inf), dim=-1)  # NaN on rows without any logit
            o = p[..., : ke - ks] @ vb
        visible = mask[:, : ke - ks].any(dim=1)
        o = torch.where(visible[None, :, None], o, torch.zeros_like(o))  # SDPA leaves NaN (or 0) on empty rows
        out[qs:qe] = o.transpose(0, 1)
        lse[qs:qe] = torch.logsumexp(s.masked_fill(~mask[None], -math.inf), dim=-1).transpose(0, 1)
    return out, lse


def check_attn(out, lse, q, v, ref_out, ref_lse, dtype, out_scale=2.0, min_live=1, empty=None):
    """`empty` [Nq] bool: queries that see no key (default: those whose reference lse is -inf). They must give
    out == 0; their lse is -inf without sinks and the sink (finite, compared with the others) with sinks."""
    nq, hq = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    assert out.dtype == q.dtype, out.dtype
    assert lse.dtype == torch.float32, lse.dtype
    assert tuple(out.shape) == (nq, hq, dv), tuple(out.shape)
    assert tuple(lse.shape) == (nq, hq), tuple(lse.shape)
    assert out.device == q.device and lse.device == q.device
    out, lse = out.cpu(), lse.cpu()
    dead = torch.isneginf(ref_lse) if empty is None else empty.cpu()[:, None].expand(nq, hq)
    assert (~dead).sum() >= min_live
    want_inf = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), want_inf), f"lse == -inf at {torch.isneginf(lse).nonzero().tolist()}, " \
        f"expected at {want_inf.nonzero().tolist()}"
    assert (out[dead] == 0).all(), "queries without visible keys must give out = 0"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype, out_scale))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=LSE_ATOL, rtol=1e-5)


def make_qkv(device, dtype, nq, nk, hq, hkv, d, dv=None, seed=0):
    gen = make_generator(seed)
    dv = d if dv is None else dv
    q = randn((nq, hq, d), gen=gen, dtype=dtype, device=device)
    k = randn((nk, hkv, d), gen=gen, dtype=dtype, device=device)
    v = randn((nk, hkv, dv), gen=gen, dtype=dtype, device=device)
    return q, k, v


def run_check(impl, q, k, v, q_pos, kv_pos=None, cu_q=None, cu_k=None, scale=None, dtype=None, min_live=1,
              window=-1, softcap=0.0, sinks=None, out_scale=2.0):
    dtype = q.dtype if dtype is None else dtype
    out, lse = impl.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, window=window, softcap=softcap,
                                 sinks=sinks)
    ref_out, ref_lse = sdpa_reference(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, window, softcap, sinks)
    empty = ~oracle_mask(q_pos, kv_pos, cu_q, cu_k, k.shape[0], window).any(dim=1)
    check_attn(out, lse, q, v, ref_out, ref_lse, dtype, out_scale=out_scale, min_live=min_live, empty=empty)
    return out, lse, ref_lse


def pos(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


# ---- heads, head dims, dtypes ---------------------------------------------------------------------------------

HEAD_CFGS = [(9, 3, 64, 64), (8, 8, 128, 128), (32, 8, 128, 128), (4, 2, 80, 80), (6, 3, 64, 40)]


@pytest.mark.parametrize("cfg", HEAD_CFGS, ids=[f"hq{a}-hkv{b}-d{c}-dv{e}" for a, b, c, e in HEAD_CFGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_heads_and_dims(impl, device, dtype, cfg):
    hq, hkv, d, dv = cfg
    nk = 70
    q, k, v = make_qkv(device, dtype, 9, nk, hq, hkv, d, dv, seed=hq + d)
    q_pos = pos([33, 5, 69, 0, 33, 71, 12, 50, 2], device)  # unsorted, duplicate, 0, beyond the last key
    run_check(impl, q, k, v, q_pos)


def test_gqa_head_mapping(impl, device):
    """Query head h reads kv head h // (Hq / Hkv): with kv heads made very different, a wrong mapping
    (e.g. h % Hkv) fails by a wide margin."""
    q, k, v = make_qkv(device, torch.float32, 5, 30, 6, 3, 32, seed=4)
    v = v + torch.tensor([0.0, 10.0, -10.0], device=device)[None, :, None]
    out, lse, _ = run_check(impl, q, k, v, pos([29, 3, 17, 8, 29], device))
    assert (out[:, 2:4].mean() - 10.0).abs() < 1.0  # heads 2, 3 -> kv head 1


# ---- query position patterns --------------------------------------------------------------------------------

PATTERNS = {
    "unsorted_dups": [17, 3, 3, 49, 0, 25, 17, 60, 1],
    "causal_prefill": list(range(50)),
    "decode": [49],
    "zeros": [0, 0, 1],
    "beyond_cache": [100, 75],
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_query_patterns(impl, device, pattern):
    qp = PATTERNS[pattern]
    q, k, v = make_qkv(device, torch.float32, len(qp), 50, 4, 2, 64, seed=len(qp))
    run_check(impl, q, k, v, pos(qp, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_causal_prefill_matches_sdpa_is_causal(impl, device, dtype):
    """q_pos = arange(N) with the whole cache is ordinary causal attention (SDPA is_causal=True)."""
    n, hq, hkv, d = 37, 6, 2, 64
    q, k, v = make_qkv(device, dtype, n, n, hq, hkv, d, seed=8)
    out, lse = impl.partial_attn(q, k, v, torch.arange(n, device=device))
    q64, k64, v64 = (t.cpu().double().transpose(0, 1)[None] for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(3, dim=1), v64.repeat_interleave(3, dim=1)
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)[0].transpose(0, 1)
    torch.testing.assert_close(out.cpu().double(), want, **tol(dtype, 2.0))
    scores = (q64 @ k64.transpose(-1, -2))[0] / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    want_lse = torch.logsumexp(scores.masked_fill(~causal, -math.inf), dim=-1).transpose(0, 1)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=LSE_ATOL, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_medium_causal_prefill(impl, device, dtype):
    n = 300
    q, k, v = make_qkv(device, dtype, n, n, 4, 1, 64, seed=10)
    run_check(impl, q, k, v, torch.arange(n, device=device))


def test_decode_equals_last_row_of_prefill(impl, device):
    n = 40
    q, k, v = make_qkv(device, torch.float32, n, n, 8, 2, 64, seed=9)
    full, full_lse = impl.partial_attn(q, k, v, torch.arange(n, device=device))
    one, one_lse = impl.partial_attn(q[-1:], k, v, pos([n - 1], device))
    torch.testing.assert_close(one, full[-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_lse, full_lse[-1:], atol=1e-5, rtol=1e-5)


# ---- compressed caches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compressed_cache(impl, device, dtype):
    """kv_pos out of order with gaps, evicted slots (-1), and queries whose only candidate keys are evicted
    (or that precede every key): those get out 0 and lse -inf."""
    gen = make_generator(12)
    nk = 40
    others = torch.randperm(140, generator=gen)[:38] + 10  # distinct positions in [10, 150)
    kv = torch.cat([torch.tensor([3, 4]), others])
    kv = kv[torch.randperm(nk, generator=gen)]
    evict = (kv == 3) | (kv == 4)
    evict[torch.randperm(nk, generator=gen)[:8]] = True
    kv[evict] = -1
    first_live = kv[kv >= 0].min().item()
    qp = [7, 2, 149, 60, 60, first_live - 1, 4, 200, first_live, 0]
    q, k, v = make_qkv(device, dtype, len(qp), nk, 4, 2, 64, seed=13)
    _, _, ref_lse = run_check(impl, q, k, v, pos(qp, device), kv.to(device), min_live=4)
    dead_rows = torch.isneginf(ref_lse).all(dim=1)
    assert dead_rows[[0, 1, 5, 6, 9]].all() and not dead_rows[[2, 3, 8]].any()


def test_evicted_keys_are_ignored(impl, device):
    """Garbage in evicted slots (huge values) must not leak into the output."""
    q, k, v = make_qkv(device, torch.float32, 6, 30, 4, 4, 32, seed=14)
    kv = torch.arange(30)
    kv[[2, 9, 17]] = -1
    k[[2, 9, 17]] *= 50.0
    v[[2, 9, 17]] += 1000.0
    out, _, _ = run_check(impl, q, k, v, pos([29, 10, 3, 25, 17, 9], device), kv.to(device))
    assert out.abs().max() < 10


# ---- tile boundaries --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nk", [1, 63, 65, 257, 1000])
def test_key_counts_off_tiles(impl, device, nk):
    gen = make_generator(nk)
    q, k, v = make_qkv(device, torch.float32, 7, nk, 4, 2, 64, seed=nk)
    qp = torch.randint(0, nk + 3, (7,), generator=gen)
    qp[0], qp[1] = nk - 1, 0
    run_check(impl, q, k, v, qp.to(device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_long_cache_low_precision(impl, device, dtype):
    q, k, v = make_qkv(device, dtype, 5, 1000, 8, 2, 128, seed=15)
    run_check(impl, q, k, v, pos([999, 0, 500, 731, 1200], device))


# ---- split-KV: few query tiles against a long cache --------------------------------------------------------------
# The CUDA tensor-core kernel cuts each block's key range into slices when its blocks cannot fill the device
# (csrc/cuda/partial_attn.cu, kv_splits), then merges the slices' outputs by their lse. These cases have few query
# tiles and 700-1200 keys: tiles whose last query is early leave later slices empty; evicted keys and a sequence
# without keys leave rows that see nothing in some or all slices.


def split_case(device, dtype, name):
    gen = make_generator(21)
    if name == "causal":  # 40 queries (3 tiles of 16 at G = 4), default key positions
        q, k, v = make_qkv(device, dtype, 40, 1200, 8, 2, 128, seed=22)
        q_pos = torch.randint(0, 1200, (40,), generator=gen)
        q_pos[:3] = torch.tensor([0, 5, 1199])
        return q, k, v, q_pos.to(device), None, None, None
    if name == "kv_pos":  # compressed cache: shuffled positions, a fifth evicted; G = 3 at head_dim 64
        q, k, v = make_qkv(device, dtype, 30, 900, 9, 3, 64, seed=23)
        kv_pos = torch.randperm(1000, generator=gen)[:900]
        kv_pos[torch.rand(900, generator=gen) < 0.2] = -1
        q_pos = torch.randint(0, 1000, (30,), generator=gen)
        q_pos[0] = int(kv_pos[kv_pos >= 0].min()) - 1  # sees no key at all
        return q, k, v, q_pos.to(device), kv_pos.to(device), None, None
    seqs = [(5, 700), (0, 300), (3, 0), (7, 1100)]  # ragged: (queries, keys) per sequence
    nq, nk = sum(s[0] for s in seqs), sum(s[1] for s in seqs)
    q, k, v = make_qkv(device, dtype, nq, nk, 4, 4, 128, seed=24)
    q_pos = torch.cat([torch.randint(0, n_k + 50, (n_q,), generator=gen) for n_q, n_k in seqs])
    cu_q = torch.tensor([0] + [s[0] for s in seqs]).cumsum(0).to(device)
    cu_k = torch.tensor([0] + [s[1] for s in seqs]).cumsum(0).to(device)
    return q, k, v, q_pos.to(device), None, cu_q, cu_k


@pytest.mark.parametrize("name", ["causal", "kv_pos", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_kv(impl, device, dtype, name, monkeypatch):
    args = split_case(device, dtype, name)
    out, lse, _ = run_check(impl, *args)
    if isinstance(impl, EmulatedCudaOps):
        # One SM: the blocks fill it, no split. The single-pass result must agree too, and differ from the split
        # one in rounding somewhere, or the split path never ran.
        monkeypatch.setenv("SIMT_EMU_SMS", "1")
        _, lse1, _ = run_check(impl, *args)
        assert not torch.equal(lse1, lse), "the split and single-pass runs gave identical lse: no split happened"


# ---- the CPU kernel's paths ----------------------------------------------------------------------------------------
# csrc/cpu/partial_attn.cpp chooses per call how a K/V tile reaches the micro-kernels: with at most two query tiles
# per sequence (decoding, the few queries of a small recompute), fp32 K and V are read where they lie ("direct")
# and other dtypes, or a V width the micro-kernel cannot take unpadded, are packed by the item that reads them
# ("local"); with more, every tile is packed once for all ("shared"). With fewer than 4 items per thread and keys
# to spare, each item's keys are cut into slices merged after by their running max and sum ("split"), so the thread
# count changes the rounding. Each case runs on 1 thread (never split) and 4 (split where the call is small), both
# against the float64 reference; in the small ones the two must differ in rounding somewhere, or the split never
# ran (bf16's rounding of one row can hide it: not asserted), and in the large ones they must be the same bits.

CPU_PATHS = {  # name: (queries, (hq, hkv, d, dv), keys, dtype, split on 4 threads; None: not asserted)
    "direct_decode": (1, (9, 3, 64, 64), 1031, torch.float32, True),
    "direct_8_rows": (2, (8, 2, 128, 128), 700, torch.float32, True),
    "direct_d80_short": (2, (4, 2, 80, 80), 13, torch.float32, False),
    "direct_2_tiles": (30, (9, 3, 64, 64), 900, torch.float32, True),
    "local_dv40": (1, (6, 3, 64, 40), 900, torch.float32, True),
    "local_bf16_decode": (1, (9, 3, 64, 64), 1031, torch.bfloat16, None),
    "local_fp16_2_tiles": (30, (9, 3, 64, 64), 900, torch.float16, True),
    "shared": (300, (9, 3, 64, 64), 600, torch.float32, False),
}
CPU_FEATURES = {"plain": (False, -1, 0.0, False), "kv_pos_window": (True, 300, 0.0, False),
                "softcap_sinks": (True, -1, 8.0, True)}  # (kv_pos, window, softcap, sinks)


@pytest.mark.parametrize("features", list(CPU_FEATURES))
@pytest.mark.parametrize("path", list(CPU_PATHS))
def test_cpu_kernel_paths(path, features):
    nq, (hq, hkv, d, dv), nk, dtype, splits = CPU_PATHS[path]
    with_kv_pos, window, softcap, with_sinks = CPU_FEATURES[features]
    ops = impl_module("ops")
    gen = make_generator(31)
    q, k, v = make_qkv("cpu", dtype, nq, nk, hq, hkv, d, dv, seed=32)
    q_pos = torch.randint(nk // 2, nk + 20, (nq,), generator=gen)
    q_pos[0] = nk + 20  # past every key: sees the whole cache (the decode row)
    kv_pos = None
    if with_kv_pos:  # shuffled positions, a tenth evicted
        kv_pos = torch.randperm(nk + 20, generator=gen)[:nk]
        kv_pos[torch.rand(nk, generator=gen) < 0.1] = -1
    sinks = make_sinks(hq, "cpu", seed=33) if with_sinks else None
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 4):
            torch.set_num_threads(n)
            out, lse, _ = run_check(ops, q, k, v, q_pos, kv_pos, window=window, softcap=softcap, sinks=sinks)
            results.append((out, lse))
    finally:
        torch.set_num_threads(threads)
    (out1, lse1), (out4, lse4) = results
    if splits:
        assert not (torch.equal(out1, out4) and torch.equal(lse1, lse4)), "no split on 4 threads"
    elif splits is not None:
        assert torch.equal(out1, out4) and torch.equal(lse1, lse4), "split where the call has work enough"


def test_cpu_direct_path_runs():
    """A decode row computed alone (fp32: K/V read in place) and inside a call of 100 queries (packed tiles): both
    right, and different in rounding, or the unpacked path never ran."""
    ops = impl_module("ops")
    q, k, v = make_qkv("cpu", torch.float32, 100, 500, 9, 3, 64, seed=34)
    q_pos = torch.arange(400, 500)
    alone, _, _ = run_check(ops, q[-1:], k, v, q_pos[-1:])
    many, _, _ = run_check(ops, q, k, v, q_pos)
    torch.testing.assert_close(alone, many[-1:], atol=1e-5, rtol=1e-5)
    assert not torch.equal(alone, many[-1:]), "the decode row was computed as the packed tiles compute it"


# ---- ragged batches ---------------------------------------------------------------------------------------------

SEQS = [(3, 10), (0, 7), (2, 0), (5, 65), (1, 1), (4, 33)]  # (queries, keys); one with no queries, one with no keys


def ragged_case(device, dtype, with_kv_pos, seed=16):
    gen = make_generator(seed)
    nq, nk = sum(s[0] for s in SEQS), sum(s[1] for s in SEQS)
    q, k, v = make_qkv(device, dtype, nq, nk, 6, 2, 64, seed=seed)
    q_pos, kv_pos = [], []
    for n_q, n_k in SEQS:
        q_pos.append(torch.randint(0, n_k + 3, (n_q,), generator=gen))
        kp = torch.randperm(n_k + 5, generator=gen)[:n_k]
        kp[torch.rand(n_k, generator=gen) < 0.2] = -1
        kv_pos.append(kp)
    cu_q = torch.tensor([0] + [s[0] for s in SEQS]).cumsum(0)
    cu_k = torch.tensor([0] + [s[1] for s in SEQS]).cumsum(0)
    kv = torch.cat(kv_pos).to(device) if with_kv_pos else None
    return q, k, v, torch.cat(q_pos).to(device), kv, cu_q, cu_k


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("with_kv_pos", [True, False], ids=["kv_pos", "default_kv_pos"])
def test_ragged_batch(impl, device, cu_dtype, with_kv_pos):
    q, k, v, q_pos, kv_pos, cu_q, cu_k = ragged_case(device, torch.float32, with_kv_pos)
    cu_q, cu_k = cu_q.to(device=device, dtype=cu_dtype), cu_k.to(device=device, dtype=cu_dtype)
    out, lse, ref_lse = run_check(impl, q, k, v, q_pos, kv_pos, cu_q, cu_k)
    # queries of the sequence without keys (rows 3, 4) see nothing; each sequence equals its own unbatched call
    assert torch.isneginf(lse[3:5].cpu()).all()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(SEQS)):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            continue
        kp = kv_pos[ck[b]:ck[b + 1]] if kv_pos is not None else None  # default: 0..n-1 within the sequence
        o, l = impl.partial_attn(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], q_pos[cq[b]:cq[b + 1]], kp)
        torch.testing.assert_close(o, out[cq[b]:cq[b + 1]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, lse[cq[b]:cq[b + 1]], atol=1e-5, rtol=1e-5)


def test_ragged_default_kv_pos_restarts_per_sequence(impl, device):
    """Without kv_pos, key positions count from 0 in every sequence: a query at position 0 of the second sequence
    sees exactly that sequence's first key (out = v of that key)."""
    q, k, v = make_qkv(device, torch.float32, 2, 12, 2, 2, 16, seed=17)
    cu_q = torch.tensor([0, 1, 2], device=device)
    cu_k = torch.tensor([0, 5, 12], device=device)
    out, _ = impl.partial_attn(q, k, v, pos([0, 0], device), None, cu_q, cu_k)
    torch.testing.assert_close(out[1], v[5], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0], v[0], atol=1e-6, rtol=1e-6)


def test_no_queries(impl, device):
    q, k, v = make_qkv(device, torch.float32, 0, 9, 4, 2, 32, dv=24, seed=18)
    out, lse = impl.partial_attn(q, k, v, torch.empty(0, dtype=torch.int64, device=device))
    assert tuple(out.shape) == (0, 4, 24) and out.dtype == torch.float32
    assert tuple(lse.shape) == (0, 4) and lse.dtype == torch.float32


# ---- sliding window, softcap, sinks ---------------------------------------------------------------------------------
# window > 0: key j is visible to query i only if also q_pos[i] - window < kv_pos[j] (HF's sliding window); softcap > 0:
# each logit s = scale * q.k becomes softcap * tanh(s / softcap) before the softmax (Gemma-2); sinks fp32 [Hq]: one
# more logit per head, not multiplied by scale, in the softmax denominator but not in the output (gpt-oss). lse is of
# the capped logits with the sink; a query with no visible key gives out 0 and lse -inf, or the sink with sinks.


def make_sinks(hq, device, seed, dominant=(), negligible=()):
    """Sinks of the order of a row's lse over a few dozen keys (3 +- 1.5), so they take a sizeable share of every
    row; at the `dominant` heads one (60) that outweighs every key by e^50 or more, at the `negligible` heads one
    (-1e4) that no key notices."""
    gen = make_generator(seed)
    sinks = 3.0 + 1.5 * torch.randn(hq, generator=gen)
    sinks[list(dominant)] = 60.0
    sinks[list(negligible)] = -1e4
    return sinks.to(device)


def changed_rows(a, b, margin):
    """[Nq] bool: rows (queries) where two outputs differ by more than `margin` somewhere."""
    return ((a.cpu().double() - b.cpu().double()).abs() > margin).flatten(1).any(dim=1)


WINDOWS = {"1": 1, "7": 7, "64": 64, "longer_than_cache": 200, "beyond_int32": 2**32 + 5}


@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
def test_window_sizes(impl, device, window):
    """90 keys at the default positions; queries unsorted, duplicated, at 0, on both sides of every window edge and
    past the cache: a window longer than the cache still hides the early keys from a query far past it (q_pos 250
    sees keys 51..89 with window 200, q_pos 300 none). Every row the window changes must change measurably, every
    other row must not change; a window past int32 (2^32 + 5: 5 if truncated) is no window."""
    nk, hq, hkv = 90, 6, 2
    q, k, v = make_qkv(device, torch.float32, 14, nk, hq, hkv, 64, seed=30 + window % 1000)
    qp = pos([89, 0, 45, 45, 7, 63, 64, 250, 300, 1, 89, 130, 6, 8], device)
    out, _, _ = run_check(impl, q, k, v, qp, window=window)
    plain_out, _ = sdpa_reference(q, k, v, qp)
    windowed = (oracle_mask(qp, None, None, None, nk, window) != oracle_mask(qp, None, None, None, nk)).any(dim=1)
    assert windowed.any() == (window < 300)
    assert torch.equal(changed_rows(out, plain_out, 1e-3), windowed)
    if window == 1:  # each query sees the one key at its own position: out is that key's value, exactly
        for i, p in enumerate(qp.tolist()):
            want = v[p].repeat_interleave(hq // hkv, dim=0) if p < nk else torch.zeros_like(out[i])
            torch.testing.assert_close(out[i], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_window_query_patterns(impl, device, pattern):
    """The query patterns above (unsorted with duplicates, prefill, decode, zeros, past the cache), window 30."""
    qp = PATTERNS[pattern]
    q, k, v = make_qkv(device, torch.float32, len(qp), 50, 4, 2, 64, seed=40 + len(qp))
    run_check(impl, q, k, v, pos(qp, device), window=30)


@pytest.mark.parametrize("window", [3, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_compressed_cache(impl, device, dtype, window):
    """kv_pos shuffled with gaps and evicted slots. Queries one past the last live key's window (sees nothing),
    at its last position (sees it), beyond every window, before every key, and ones whose window holds only gaps or
    evicted keys."""
    gen = make_generator(50 + window)
    nk = 40
    # positions in [10, 60) and [90, 150) (a gap of 30); 100..102 are always there, and evicted
    pool = torch.cat([torch.arange(10, 60), torch.arange(90, 100), torch.arange(103, 150)])
    kv = torch.cat([pool[torch.randperm(len(pool), generator=gen)[: nk - 3]], torch.tensor([100, 101, 102])])
    kv = kv[torch.randperm(nk, generator=gen)]
    kv[(kv >= 100) & (kv <= 102)] = -1
    kv[torch.randperm(nk, generator=gen)[:5]] = -1
    live = kv[kv >= 0]
    first, last = int(live.min()), int(live.max())
    after_gap = int(live[live >= 90].min()) + 1  # sees the first key after the gap (and, without a window, many)
    qp = [last + window - 1, last + window, 200, 60, 60, 149, first, first - 1, 85, 102, 7, after_gap]
    q, k, v = make_qkv(device, dtype, len(qp), nk, 4, 2, 64, seed=51 + window)
    out, _, ref_lse = run_check(impl, q, k, v, pos(qp, device), kv.to(device), window=window, min_live=4)
    dead = torch.isneginf(ref_lse).all(dim=1)
    # one past the last key's window, past every window, before every key, in the gap; at 102 a window of 3 holds
    # only evicted slots
    assert dead[[1, 2, 7, 8]].all() and not dead[[0, 6, 11]].any() and dead[9] == (window == 3)
    plain_out, _ = sdpa_reference(q, k, v, pos(qp, device), kv)
    assert changed_rows(out, plain_out, 1e-2)[[1, 2, 8, 9, 11]].all()


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("window", [2, 8])
def test_window_ragged_batch(impl, device, window, with_sinks):
    """cu_seqlens with a window (and sinks): each sequence equals its own unbatched call; the queries of the
    sequence without keys (rows 3, 4) get lse -inf or the sinks."""
    q, k, v, q_pos, kv_pos, cu_q, cu_k = ragged_case(device, torch.float32, True, seed=52)
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    sinks = make_sinks(q.shape[1], device, seed=53) if with_sinks else None
    out, lse, _ = run_check(impl, q, k, v, q_pos, kv_pos, cu_q, cu_k, window=window, sinks=sinks, min_live=5)
    if with_sinks:
        torch.testing.assert_close(lse[3:5], sinks[None].expand(2, -1), atol=1e-6, rtol=1e-6)
    else:
        assert torch.isneginf(lse[3:5].cpu()).all()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(SEQS)):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            continue
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l = impl.partial_attn(q[qs], k[ks], v[ks], q_pos[qs], kv_pos[ks], window=window, sinks=sinks)
        torch.testing.assert_close(o, out[qs], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, lse[qs], atol=1e-5, rtol=1e-5)


# Long caches with a window: most 64-key tiles lie wholly outside every window of a query tile (the kernels skip
# them), and few query tiles against 1000-1200 keys split the keys on the tensor cores (head_dim 128, fp16/bf16), so
# slices whose keys are all outside the tile's windows are empty and the merge must ignore them. Some queries sit just
# past multiples of 320 or 384 keys (slice ends) so their windows straddle two slices.


def window_split_case(device, dtype, name):
    gen = make_generator(60)
    if name == "causal":  # window 64; 40 queries (3 tiles of 16 at G = 4), clustered at both ends, default positions
        q, k, v = make_qkv(device, dtype, 40, 1200, 8, 2, 128, seed=61)
        q_pos = torch.cat([torch.randint(0, 150, (12,), generator=gen),
                           torch.tensor([0, 5, 330, 400, 700, 800, 1000, 1199]),
                           torch.randint(1000, 1200, (12,), generator=gen),
                           torch.randint(0, 1200, (8,), generator=gen)])
        q_pos = q_pos[torch.randperm(40, generator=gen)]
        return (q, k, v, q_pos.to(device), None, None, None), dict(window=64)
    if name == "gemma2":  # window 200 + softcap 20 over a compressed cache: shuffled positions, a fifth evicted, G = 4
        q, k, v = make_qkv(device, dtype, 30, 1000, 12, 3, 128, seed=62)
        q = (q.float() * 4.0).to(dtype)  # logits ~ N(0, 16): the cap bites
        kv_pos = torch.randperm(1100, generator=gen)[:1000]
        kv_pos[torch.rand(1000, generator=gen) < 0.2] = -1
        q_pos = torch.randint(0, 1100, (30,), generator=gen)
        q_pos[0] = int(kv_pos[kv_pos >= 0].min()) - 1  # sees no key at all
        q_pos[1] = int(kv_pos.max()) + 200  # every live key is outside its window
        return (q, k, v, q_pos.to(device), kv_pos.to(device), None, None), dict(window=200, softcap=20.0)
    # gpt-oss: window 160 + sinks over a ragged batch, G = 1; one sequence without queries, one without keys
    seqs = [(5, 700), (0, 300), (3, 0), (7, 1100)]
    nq, nk = sum(s[0] for s in seqs), sum(s[1] for s in seqs)
    q, k, v = make_qkv(device, dtype, nq, nk, 4, 4, 128, seed=63)
    q_pos = torch.tensor([130, 260, 450, 640, 699] + [0, 5, 9] + [0, 390, 520, 650, 780, 1000, 1099])
    cu_q = torch.tensor([0] + [s[0] for s in seqs]).cumsum(0).to(device)
    cu_k = torch.tensor([0] + [s[1] for s in seqs]).cumsum(0).to(device)
    sinks = make_sinks(4, device, seed=64, dominant=[3])
    return (q, k, v, q_pos.to(device), None, cu_q, cu_k), dict(window=160, sinks=sinks)


@pytest.mark.parametrize("name", ["causal", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_window_split_kv(impl, device, dtype, name, monkeypatch):
    """test_split_kv with a window: alone, with softcap (Gemma-2) and with sinks (gpt-oss)."""
    args, kw = window_split_case(device, dtype, name)
    out, lse, _ = run_check(impl, *args, **kw)
    plain_out, _ = sdpa_reference(*args)
    assert changed_rows(out, plain_out, 0.05).float().mean() > 0.5  # the window (and cap, sinks) matter
    if isinstance(impl, EmulatedCudaOps):
        # One SM: no split. The single-pass result must agree too, and differ from the split one in rounding
        # somewhere, or the split path never ran.
        monkeypatch.setenv("SIMT_EMU_SMS", "1")
        _, lse1, _ = run_check(impl, *args, **kw)
        assert not torch.equal(lse1, lse), "the split and single-pass runs gave identical lse: no split happened"


def sliding_window_causal_mask(n, window):
    """[n, n] bool: causal attention with HF's sliding window, by transformers' own mask function when importable
    (transformers.masking_utils), else an explicit band: tril & triu(-(window - 1)). A masking_utils without any of
    the functions named here fails the test: the caller's band would then be compared with itself."""
    idx = torch.arange(n)
    try:
        from transformers import masking_utils
    except ImportError:
        return torch.ones(n, n, dtype=torch.bool).tril() & torch.ones(n, n, dtype=torch.bool).triu(-(window - 1))
    for name in ("sliding_window_causal_mask_function", "sliding_window_causal_function"):
        fn = getattr(masking_utils, name, None)
        if fn is not None:
            return fn(window)(0, 0, idx[:, None], idx[None, :]).expand(n, n)
    overlay = getattr(masking_utils, "sliding_window_overlay", None)
    if overlay is None:
        pytest.fail("transformers.masking_utils has none of the mask functions sliding_window_causal_mask names")
    return torch.ones(n, n, dtype=torch.bool).tril() & overlay(window)(0, 0, idx[:, None], idx[None, :])


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_causal_prefill_matches_hf_mask(impl, device, dtype, window):
    """q_pos = arange(N) over the whole cache with a window is HF's sliding-window causal attention: float64 SDPA
    under transformers' mask (a band of `window` keys ending at the query's own)."""
    n, hq, hkv, d = 45, 6, 2, 64
    mask = sliding_window_causal_mask(n, window)
    band = torch.ones(n, n, dtype=torch.bool).tril() & torch.ones(n, n, dtype=torch.bool).triu(-(window - 1))
    assert torch.equal(mask, band) and mask.sum(dim=1).max() == window
    q, k, v = make_qkv(device, dtype, n, n, hq, hkv, d, seed=70 + window)
    out, lse = impl.partial_attn(q, k, v, torch.arange(n, device=device), window=window)
    q64, k64, v64 = (t.cpu().double().transpose(0, 1)[None] for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(3, dim=1), v64.repeat_interleave(3, dim=1)
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)[0].transpose(0, 1)
    torch.testing.assert_close(out.cpu().double(), want, **tol(dtype, 2.0))
    scores = (q64 @ k64.transpose(-1, -2))[0] / math.sqrt(d)
    want_lse = torch.logsumexp(scores.masked_fill(~mask, -math.inf), dim=-1).transpose(0, 1)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=LSE_ATOL, rtol=1e-5)
    causal = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)[0].transpose(0, 1)
    assert torch.equal(changed_rows(out, causal, 0.05), torch.arange(n) >= window)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softcap_saturates(impl, device, dtype, softcap):
    """q scaled so the logits are ~ N(0, (4 softcap)^2): most of them saturate tanh. The capped result must match the
    oracle and differ from the uncapped one by a wide margin (> 1.0; out is O(1)) on every row that sees two keys or
    more (uncapped: close to one-hot; capped: a near-even mix of every saturated key); capped lse <= softcap +
    log(keys), far below the uncapped one."""
    nk = 80
    q, k, v = make_qkv(device, dtype, 14, nk, 6, 2, 64, seed=80 + int(softcap))
    q = (q.float() * (4.0 * softcap)).to(dtype)
    qp = pos([79, 0, 40, 40, 12, 63, 64, 100, 5, 79, 33, 20, 70, 1], device)
    out, lse, ref_lse = run_check(impl, q, k, v, qp, softcap=softcap)
    plain_out, plain_lse = sdpa_reference(q, k, v, qp)
    assert torch.equal(changed_rows(out, plain_out, 1.0), qp.cpu() >= 1)
    assert (lse.cpu() <= softcap + math.log(nk) + 1e-3).all()
    assert ((plain_lse - ref_lse)[qp.cpu() >= 5] > softcap).all()  # rows of 6 keys or more: their top key saturates


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale0.3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sinks(impl, device, dtype, scale):
    """Random sinks of the order of the rows' lse, one dominating (head 1: out ~ 0, lse ~ 60) and one negligible
    (head 2: as without sinks); a compressed cache whose first key is at 5, so queries at 2 and 0 see nothing
    (lse == their heads' sinks)."""
    hq, hkv = 8, 2
    q, k, v = make_qkv(device, dtype, 10, 70, hq, hkv, 64, seed=90)
    kv = torch.arange(70) + 5
    kv[[10, 20, 21]] = -1
    kv = kv.to(device)
    qp = pos([74, 2, 40, 40, 5, 100, 0, 30, 60, 11], device)
    sinks = make_sinks(hq, device, seed=91, dominant=[1], negligible=[2])
    out, lse, _ = run_check(impl, q, k, v, qp, kv, scale=scale, sinks=sinks, min_live=8)
    torch.testing.assert_close(lse[[1, 6]], sinks[None].expand(2, -1), atol=1e-6, rtol=1e-6)
    assert (out[:, 1].float().abs() < 1e-10).all()
    torch.testing.assert_close(lse[:, 1], torch.full_like(lse[:, 1], 60.0), atol=1e-5, rtol=0)
    bare_out, bare_lse = impl.partial_attn(q, k, v, qp, kv, scale=scale)
    torch.testing.assert_close(out[:, 2], bare_out[:, 2], **tol(dtype))
    live = ~torch.isneginf(bare_lse[:, 2])
    torch.testing.assert_close(lse[live, 2], bare_lse[live, 2], atol=1e-5, rtol=1e-5)
    plain_out, _ = sdpa_reference(q, k, v, qp, kv, scale=scale)
    ordinary = [0, 3, 4, 5, 6, 7]
    assert changed_rows(out[:, ordinary], plain_out[:, ordinary], 0.05)[[0, 2, 3, 5, 7, 8]].all()


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_no_visible_key(impl, device, dtype, with_sinks):
    """Every way of seeing nothing, in one ragged call with a window of 3: a query before the sequence's first key,
    one whose window holds only evicted slots, one past every window, the queries of a sequence without keys.
    They get out = 0 and lse = -inf, or lse = sinks[h] (finite) with sinks; the other queries are unaffected."""
    hq = 6
    cu_q, cu_k = pos([0, 4, 6, 9], device), pos([0, 20, 20, 50], device)
    kv = torch.cat([torch.arange(20) + 10, torch.arange(30)])
    kv[10:15] = -1  # positions 20..24 of the first sequence evicted
    qp = pos([5, 22, 40, 15] + [3, 100] + [29, 50, 0], device)
    q, k, v = make_qkv(device, dtype, 9, 50, hq, 2, 64, seed=95)
    sinks = make_sinks(hq, device, seed=96, negligible=[5]) if with_sinks else None
    out, lse, _ = run_check(impl, q, k, v, qp, kv.to(device), cu_q, cu_k, window=3, sinks=sinks, min_live=3)
    dead = torch.tensor([True, True, True, False, True, True, False, True, False], device=device)
    assert_bits_equal(out[dead].abs(), torch.zeros_like(out[dead]), "out of queries that see nothing")
    want = torch.full((6, hq), -math.inf, device=device) if sinks is None else sinks.expand(6, -1)
    torch.testing.assert_close(lse[dead], want, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(lse[~dead]).all() and (out[~dead] != 0).any(dim=-1).all()


MODEL_FEATURES = {
    "gemma2": dict(window=16, softcap=20.0),  # sliding window + logit softcap
    "gpt_oss": dict(window=24, sinks=True),  # sliding window + attention sinks
    "all": dict(window=10, softcap=8.0, sinks=True),
}
COMBO_CFGS = [(4, 4, 128), (9, 3, 64), (6, 2, 128), (8, 2, 64)]  # (Hq, Hkv, D): GQA groups 1, 3, 3, 4


@pytest.mark.parametrize("cfg", COMBO_CFGS, ids=[f"hq{a}-hkv{b}-d{c}" for a, b, c in COMBO_CFGS])
@pytest.mark.parametrize("model", list(MODEL_FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_feature_combos(impl, device, dtype, model, cfg):
    """Window with softcap (Gemma-2), window with sinks (gpt-oss), and all three; 150 keys and queries at 90-169, so
    a window of 10-24 leaves keys 0..65 (whole key tiles) outside every query's window, and queries past 149 + window
    see nothing; q scaled by 3 so the cap changes the logits."""
    hq, hkv, d = cfg
    gen = make_generator(100 + d + hq)
    q, k, v = make_qkv(device, dtype, 20, 150, hq, hkv, d, seed=101 + d + hq)
    q = (q.float() * 3.0).to(dtype)
    qp = torch.randint(90, 170, (20,), generator=gen)
    qp[:4] = torch.tensor([149, 149, 90, 169])
    kw = dict(MODEL_FEATURES[model])
    if kw.pop("sinks", False):
        kw["sinks"] = make_sinks(hq, device, seed=102 + hq, dominant=[hq - 1], negligible=[0])
    _, lse, _ = run_check(impl, q, k, v, qp.to(device), **kw)
    for name in list(kw):  # each feature matters on these data: the oracle without it is far from the result
        _, lse_without = sdpa_reference(q, k, v, qp, **{n: a for n, a in kw.items() if n != name})
        diff = (lse.cpu().double() - lse_without).abs().nan_to_num(nan=0.0)  # -inf - -inf: both see nothing
        assert diff.max() > 0.1, f"{name} makes no difference"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_explicit_defaults_bit_identical(impl, device, dtype):
    """window=-1, softcap=0.0, sinks=None given explicitly (positionally or by name) are the defaults, bit for bit."""
    q, k, v, q_pos, kv_pos, cu_q, cu_k = ragged_case(device, dtype, True, seed=110)
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    for scale in (None, 0.2):
        out, lse = impl.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale)
        for explicit in (impl.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, -1, 0.0, None),
                         impl.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, window=-1, softcap=0.0,
                                           sinks=None)):
            assert_bits_equal(explicit[0], out, "out")
            assert_bits_equal(explicit[1], lse, "lse")
    out, lse = impl.partial_attn(q, k, v, q_pos)
    for explicit in (impl.partial_attn(q, k, v, q_pos, None, None, None, None, -1, 0.0, None),
                     impl.partial_attn(q, k, v, q_pos, window=-1, softcap=0.0, sinks=None)):
        assert_bits_equal(explicit[0], out, "out")
        assert_bits_equal(explicit[1], lse, "lse")


# ---- scale, strides, low precision vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.05, 0.37, 1.0])
def test_explicit_scale(impl, device, scale):
    q, k, v = make_qkv(device, torch.float32, 6, 45, 4, 2, 64, seed=19)
    qp = pos([44, 0, 13, 30, 30, 7], device)
    run_check(impl, q, k, v, qp, scale=scale)
    # the default is 1/sqrt(D)
    a, la = impl.partial_attn(q, k, v, qp)
    b, lb = impl.partial_attn(q, k, v, qp, scale=1.0 / 8.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_views(impl, device, dtype):
    """q a head-dim slice of a wider buffer, k/v one batch row of an HF cache [B, Hkv, S, D] as [S, Hkv, D]."""
    gen = make_generator(20)
    nq, hq, hkv, d, s = 7, 6, 2, 64, 90
    q = randn((nq, hq, d + 16), gen=gen, dtype=dtype, device=device)[..., 8 : 8 + d]
    k_cache = randn((2, hkv, s, d), gen=gen, dtype=dtype, device=device)
    v_cache = randn((2, hkv, s, d), gen=gen, dtype=dtype, device=device)
    k, v = k_cache[1].transpose(0, 1), v_cache[1].transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous() and k.stride(-1) == 1
    qp = pos([89, 0, 45, 45, 12, 70, 3], device)
    kv = torch.arange(s)
    kv[::7] = -1
    run_check(impl, q, k, v, qp, kv.to(device))
    out, lse = impl.partial_attn(q, k, v, qp, kv.to(device))
    out_c, lse_c = impl.partial_attn(q.contiguous(), k.contiguous(), v.contiguous(), qp, kv.to(device))
    torch.testing.assert_close(out, out_c, **tol(dtype))
    torch.testing.assert_close(lse, lse_c, atol=1e-5, rtol=1e-5)


def test_static_cache_prefix_views(impl, device):
    """k/v as cache[b, :, :T].transpose(0, 1) of a preallocated [B, Hkv, S_max, D] cache (not dense)."""
    gen = make_generator(24)
    hkv, s_max, t, d = 2, 64, 37, 32
    k_cache = randn((2, hkv, s_max, d), gen=gen, device=device)
    v_cache = randn((2, hkv, s_max, d), gen=gen, device=device)
    k, v = k_cache[0, :, :t].transpose(0, 1), v_cache[0, :, :t].transpose(0, 1)
    q = randn((4, 4, d), gen=gen, device=device)
    run_check(impl, q, k, v, pos([36, 0, 20, 50], device))


@pytest.mark.parametrize("nq", [1, 3])
def test_expanded_k(impl, device, nq):
    """fp32 K expanded over its tokens (one key row repeated: token stride 0; only the last stride is constrained)
    with a decode-size call: the CPU kernel reads fp32 K where it lies there, and once took the zero stride for its
    mark of a packed tile, reading NaN or garbage."""
    gen = make_generator(126)
    nk, hq, hkv, d = 100, 4, 2, 64
    q = randn((nq, hq, d), gen=gen, device=device)
    k = (3.0 * randn((1, hkv, d), gen=gen, device=device)).expand(nk, hkv, d)
    v = randn((nk, hkv, d), gen=gen, device=device)
    assert k.stride(0) == 0
    run_check(impl, q, k, v, pos([99, 40, 7][:nq], device))


OPS_VS_REF_FEATURES = [  # (window, softcap, with sinks)
    (-1, 0.0, False), (5, 0.0, False), (-1, 10.0, False), (-1, 0.0, True), (4, 6.0, True), (200, 0.0, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ops_vs_reference(device, dtype):
    ops, ref = impl_module("ops"), impl_module("oracle")
    for with_kv_pos in (True, False):
        q, k, v, q_pos, kv_pos, cu_q, cu_k = ragged_case(device, dtype, with_kv_pos, seed=21)
        q = (q.float() * 3.0).to(dtype)  # logits up to ~10: a cap of 6 or 10 changes them
        cu_q, cu_k = cu_q.to(device), cu_k.to(device)
        for scale in (None, 0.2):
            for window, softcap, with_sinks in OPS_VS_REF_FEATURES:
                sinks = make_sinks(q.shape[1], device, seed=22, dominant=[1], negligible=[4]) if with_sinks else None
                a, la = ops.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, window, softcap, sinks)
                b, lb = ref.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale, window, softcap, sinks)
                assert a.dtype == b.dtype == dtype and la.dtype == lb.dtype == torch.float32
                torch.testing.assert_close(a.double(), b.double(), **tol(dtype, 2.0))
                assert torch.equal(torch.isneginf(la), torch.isneginf(lb))
                live = ~torch.isneginf(lb)
                torch.testing.assert_close(la[live], lb[live], atol=LSE_ATOL, rtol=1e-5)


def test_raw_op_registered(device):
    import semshare_ops  # noqa: F401

    q, k, v = make_qkv(device, torch.float32, 4, 20, 4, 2, 32, seed=22)
    qp = pos([19, 0, 5, 12], device)
    out, lse = torch.ops.semshare.partial_attn(q, k, v, qp, None, None, None, None)
    ref_out, ref_lse = sdpa_reference(q, k, v, qp)
    check_attn(out, lse, q, v, ref_out, ref_lse, torch.float32)
    # the new arguments in schema order, positionally and by name
    sinks = make_sinks(4, device, seed=23)
    ref_out, ref_lse = sdpa_reference(q, k, v, qp, window=6, softcap=2.5, sinks=sinks)
    for out, lse in (torch.ops.semshare.partial_attn(q, k, v, qp, None, None, None, None, 6, 2.5, sinks),
                     torch.ops.semshare.partial_attn(q, k, v, qp, window=6, softcap=2.5, sinks=sinks)):
        check_attn(out, lse, q, v, ref_out, ref_lse, torch.float32)


# ---- extreme positions and non-finite values --------------------------------------------------------------------

I64_MAX = 2**63 - 1


@pytest.mark.parametrize("window", [-1, 1, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_positions_near_int64_max(impl, device, dtype, window):
    """A query position may be as large as int64 allows: it sees every key of its sequence (within its window), as
    the oracle says. The kernels clamp before adding a sequence's first key: the sum once overflowed and read "no
    visible key", or (with a window, in a later sequence) walked some 2^57 empty tiles."""
    q, k, v = make_qkv(device, dtype, 4, 200, 4, 2, 64, seed=120)
    qp = pos([I64_MAX, 3, I64_MAX - 10, 150], device)
    run_check(impl, q, k, v, qp, window=window)
    run_check(impl, q, k, v, qp, cu_q=pos([0, 2, 4], device), cu_k=pos([0, 70, 200], device), window=window)


@pytest.mark.parametrize("nk", [40, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_keys_a_query_does_not_see_never_reach_it(impl, device, dtype, nk):
    """NaN and inf in K at an evicted slot (kv_pos -1) and at positions past a query, in the key tiles it reads: the
    result is bit for bit the clean cache's. A masked logit is replaced by -inf, not added to it (NaN + -inf is
    NaN, which once made such a query report "no visible key"). 2048 keys: split over the threads or SMs too."""
    q, k, v = make_qkv(device, dtype, 3, nk, 4, 2, 64, seed=121)
    kv_pos = torch.arange(nk, device=device)
    kv_pos[7] = -1
    qp = pos([nk // 2, nk // 2 + 5, nk - 10], device)
    bad = k.clone()
    bad[7] = float("nan")  # evicted
    bad[nk - 9] = float("nan")  # past every query, in the tile of the last one
    bad[nk - 5] = float("inf")
    out, lse = impl.partial_attn(q, k, v, qp, kv_pos)
    out_bad, lse_bad = impl.partial_attn(q, bad, v, qp, kv_pos)
    assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all()
    assert torch.equal(out_bad, out) and torch.equal(lse_bad, lse)


@pytest.mark.parametrize("nk", [40, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_inputs_a_query_sees_come_out_nan(impl, device, dtype, nk):
    """A NaN key a query sees makes its row NaN (out and lse), never "no visible key" (out 0, lse -inf, as it once
    came out); a NaN sink likewise; a sink of +inf takes all the weight: out 0, lse +inf (the oracle agrees)."""
    q, k, v = make_qkv(device, dtype, 2, nk, 4, 2, 64, seed=122)
    qp = pos([nk - 1, 3], device)
    bad = k.clone()
    bad[5, 0] = float("nan")  # kv head 0, read by query heads 0 and 1; query 1 (position 3) does not see it
    out, lse = impl.partial_attn(q, bad, v, qp)
    assert torch.isnan(lse[0, :2]).all() and torch.isnan(out[0, :2].float()).all()
    assert torch.isfinite(lse[0, 2:]).all() and torch.isfinite(lse[1]).all()
    sinks = torch.tensor([math.inf, math.nan, 2.0, -math.inf], device=device)
    out, lse = impl.partial_attn(q, k, v, qp, sinks=sinks)
    ref_out, ref_lse = impl_module("oracle").partial_attn(q, k, v, qp, sinks=sinks)
    for got, want in ((lse, ref_lse), (out.float(), ref_out.float())):
        assert torch.isnan(got[:, 1]).all() and torch.isnan(want[:, 1]).all()
    assert (lse[:, 0] == math.inf).all() and (ref_lse[:, 0] == math.inf).all()
    assert (out[:, 0] == 0).all() and (ref_out[:, 0] == 0).all()
    assert torch.isfinite(lse[:, 2:]).all() and torch.isfinite(out[:, 2:].float()).all()


@pytest.mark.parametrize("nk", [40, 2048])
def test_a_nan_the_row_sees_beats_a_sink_of_inf(impl, device, nk):
    """A NaN logit makes the row NaN even beside a sink of +inf, which otherwise takes all the weight (out 0, lse
    +inf; the kernels once gave lse +inf to the NaN row too). On 4 threads the CPU kernel cuts 2048 keys into slices
    merged after (the sink joins there); the emulated CUDA kernel splits them over its SMs."""
    q, k, v = make_qkv(device, torch.float16, 2, nk, 4, 2, 64, seed=124)
    qp = pos([nk - 1, 3], device)
    k[5, 0] = float("nan")  # kv head 0 (query heads 0, 1); query 1 (position 3) does not see it
    sinks = torch.tensor([math.inf, math.inf, 2.0, 2.0], device=device)
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            for name, (out, lse) in (("kernel", impl.partial_attn(q, k, v, qp, sinks=sinks)),
                                     ("oracle", impl_module("oracle").partial_attn(q, k, v, qp, sinks=sinks))):
                assert torch.isnan(lse[0, :2]).all() and torch.isnan(out[0, :2].float()).all(), (name, n)
                assert (lse[1, :2] == math.inf).all() and (out[1, :2] == 0).all(), (name, n)
                assert torch.isfinite(lse[:, 2:]).all() and torch.isfinite(out[:, 2:].float()).all(), (name, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sink", [None, 2.0, math.inf], ids=["no_sink", "sink", "sink_inf"])
@pytest.mark.parametrize("nk", [40, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_logit_of_inf_gives_lse_inf_and_out_nan(impl, device, dtype, nk, sink):
    """A +inf logit a query sees (an inf in k, or q.k past fp32's range) gives lse +inf and out NaN, as the oracle's
    logsumexp and softmax do, with or without a sink (+inf sink included: the row is not "all weight on the sink"); a
    -inf logit counts as a key of weight 0. The kernels once gave lse NaN (e^(inf - inf) in the running sum). On 4
    threads the CPU kernel cuts 2048 keys into slices merged after; the emulated CUDA kernel splits them over its
    SMs."""
    q, k, v = make_qkv(device, dtype, 3, nk, 4, 2, 64, seed=126)
    qp = pos([nk - 1, 3, nk // 2], device)
    q[:, :, 6] = q[:, :, 6].abs() + 0.5  # > 0 for every query head: inf in k's dim 6 makes q.k +inf
    k[nk // 4, 0, 6] = math.inf  # kv head 0 (query heads 0, 1), seen by queries 0 and 2, not by 1 (position 3)
    k[1, 1, 6] = -math.inf  # kv head 1 (query heads 2, 3): a -inf logit for every query
    if dtype == torch.float32:  # q.k overflows fp32 at the last key: +inf for query 0, heads 2 and 3, only
        q[0, 2:, 9], k[nk - 1, 1, 9] = 1e20, 1e20  # scale * q.k too, however the kernels order it
    sinks = None if sink is None else torch.full((4,), sink, device=device)
    inf_rows = torch.zeros(3, 4, dtype=torch.bool)
    inf_rows[[0, 2], :2] = True
    if dtype == torch.float32:
        inf_rows[0, 2:] = True
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out, lse = impl.partial_attn(q, k, v, qp, sinks=sinks)
    finally:
        torch.set_num_threads(threads)
    ref_out, ref_lse = impl_module("oracle").partial_attn(q, k, v, qp, sinks=sinks)
    out, lse, ref_out, ref_lse = out.cpu().float(), lse.cpu(), ref_out.cpu().float(), ref_lse.cpu()
    want_inf = torch.ones_like(inf_rows) if sink == math.inf else inf_rows  # a +inf sink: lse +inf on every row
    assert torch.equal(torch.isposinf(ref_lse), want_inf) and torch.isnan(ref_out[inf_rows]).all()
    assert torch.equal(torch.isposinf(lse), want_inf), f"lse {lse[inf_rows].tolist()} where the oracle's is +inf"
    assert torch.isnan(out[inf_rows]).all(), "a row with a +inf logit gives NaN out"
    if sink == math.inf:  # every other row: all the weight on the sink
        assert (out[~inf_rows] == 0).all() and (ref_out[~inf_rows] == 0).all()
        return
    assert torch.isfinite(out[~inf_rows]).all() and torch.isfinite(lse[~inf_rows]).all()
    torch.testing.assert_close(out[~inf_rows].double(), ref_out[~inf_rows].double(), **tol(dtype, 2.0))
    torch.testing.assert_close(lse[~inf_rows], ref_lse[~inf_rows], atol=LSE_ATOL, rtol=1e-5)


def test_no_derivative_refused_by_name(device):
    """partial_attn has no derivative: under grad mode a tensor of the call that requires grad is refused by name
    (its outputs would otherwise require grad with no gradient flowing back); under no_grad the call runs."""
    q, k, v = make_qkv(device, torch.float32, 3, 20, 4, 2, 32, seed=125)
    qp = pos([19, 4, 11], device)
    sinks = torch.full((4,), 1.5, device=device)
    ops = impl_module("ops")
    for name in ("q", "k", "v", "sinks"):
        args = dict(q=q, k=k, v=v, sinks=sinks)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"partial_attn: {name} requires grad"):
            ops.partial_attn(args["q"], args["k"], args["v"], qp, sinks=args["sinks"])
        with torch.no_grad():
            out, _ = ops.partial_attn(args["q"], args["k"], args["v"], qp, sinks=args["sinks"])
        assert not out.requires_grad and torch.isfinite(out).all()


@pytest.mark.parametrize("nk", [100, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_logits_alone_in_their_key_tile_come_out_nan(impl, device, dtype, nk):
    """A row whose only visible logits in a key tile are NaN (the tile's other keys masked) comes out NaN, never "no
    visible key": NaN in q of a query at position 3, a NaN key 64 seen by a query at 64 (alone in its tile) and by
    one at the end; on 4 threads the CPU kernel cuts 2048 keys into slices, each of them NaN for a NaN q at the end.
    A max that drops NaN (the CPU tile max as a select chain and its merge of the slices by their max, the CUDA-core
    kernel's fmaxf) once gave lse -inf and out 0, or a finite row."""
    q, k, v = make_qkv(device, dtype, 4, nk, 4, 2, 64, seed=123)
    qp = pos([3, 64, 40, nk - 1], device)
    q[0, 0, 5] = float("nan")  # query 0, head 0: every logit NaN, keys past 3 masked
    q[3, 1, 9] = float("nan")  # query 3, head 1: every logit NaN, every key seen
    k[64, 1, 7] = float("nan")  # kv head 1 (query heads 2, 3): seen by queries 1 and 3, not by 2 (position 40)
    nan_rows = torch.zeros(4, 4, dtype=torch.bool)
    nan_rows[0, 0] = nan_rows[3, 1] = True
    nan_rows[1, 2:] = nan_rows[3, 2:] = True
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out, lse = impl.partial_attn(q, k, v, qp)
    finally:
        torch.set_num_threads(threads)
    ref_out, ref_lse = impl_module("oracle").partial_attn(q, k, v, qp)
    out, lse, ref_out, ref_lse = out.cpu().float(), lse.cpu(), ref_out.cpu().float(), ref_lse.cpu()
    assert torch.equal(torch.isnan(ref_lse), nan_rows) and torch.isnan(ref_out[nan_rows]).all()
    assert torch.equal(torch.isnan(lse), nan_rows), f"lse NaN at {torch.isnan(lse).nonzero().tolist()}"
    assert torch.isnan(out[nan_rows]).all(), "a row with a NaN logit must give NaN out"
    assert torch.isfinite(out[~nan_rows]).all() and torch.isfinite(lse[~nan_rows]).all()
    torch.testing.assert_close(out[~nan_rows].double(), ref_out[~nan_rows].double(), **tol(dtype, 2.0))
    torch.testing.assert_close(lse[~nan_rows], ref_lse[~nan_rows], atol=LSE_ATOL, rtol=1e-5)


@pytest.mark.parametrize("window", [I64_MAX, 2**62], ids=["2^63-1", "2^62"])
@pytest.mark.parametrize("with_kv_pos", [False, True], ids=["default_kv_pos", "kv_pos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_start_below_int64_min(impl, device, dtype, with_kv_pos, window):
    """A window as large as int64 allows (2^63 - 1: "no window") with a very negative query position sharing a
    query tile with ordinary ones: q_pos - window lies below INT64_MIN. It once wrapped to a huge positive start of
    the tile's windows, and every key of the tile was skipped (CPU, and both CUDA kernels)."""
    q, k, v = make_qkv(device, dtype, 5, 200, 4, 2, 64, seed=124)
    qp = pos([-(2**62) - 5, 150, 199, -1, 70], device)
    kv_pos = torch.arange(200, device=device) if with_kv_pos else None
    _, _, ref_lse = run_check(impl, q, k, v, qp, kv_pos, window=window, min_live=12)
    assert torch.isneginf(ref_lse[[0, 3]]).all() and torch.isfinite(ref_lse[[1, 2, 4]]).all()


@pytest.mark.parametrize("case", ["evicted_first_tile", "kv_pos_window"])
def test_cuda_core_kernel_skipped_key_tile_then_visible_one(monkeypatch, case):
    """The CUDA-core kernel (fp32: never the tensor cores) run by the emulator resuming only the lowest runnable
    warp (SIMT_EMU_ORDER=warps-ahead): a 32-key tile that no query of the block sees (all evicted, or before every
    window), then one they see. The skip decision was a shared flag that warp 0 rewrote for the next tile while
    other warps could still be reading it for this one: a deadlock at the barrier, or keys skipped by some warps
    only."""
    emulated = impl_module("cuda_emulated")
    monkeypatch.setenv("SIMT_EMU_ORDER", "warps-ahead")
    q, k, v = make_qkv("cpu", torch.float32, 8, 96, 4, 1, 32, seed=125)  # 8 queries x 4 heads: one block of 32 rows
    kv_pos = torch.arange(96)
    if case == "evicted_first_tile":
        kv_pos[:32] = -1
        kv_pos[64:] = -1
        qp, window = torch.arange(40, 48), -1
    else:  # positions shuffled within each tile; the windows of queries 80..87 start past 60: tile 0 unseen
        gen = make_generator(127)
        kv_pos = torch.cat([kv_pos[j : j + 32][torch.randperm(32, generator=gen)] for j in (0, 32, 64)])
        qp, window = torch.arange(80, 88), 20
    run_check(emulated, q, k, v, qp, kv_pos, window=window)


# ---- bad arguments ------------------------------------------------------------------------------------------------


def base_args(device):
    q, k, v = make_qkv(device, torch.float32, 5, 12, 4, 2, 32, seed=23)
    return dict(q=q, k=k, v=v, q_pos=pos([11, 0, 4, 4, 9], device), kv_pos=None, cu_seqlens_q=None,
                cu_seqlens_k=None, scale=None, window=-1, softcap=0.0, sinks=None)


ARG_NAMES = ("q", "k", "v", "q_pos", "kv_pos", "cu_seqlens_q", "cu_seqlens_k", "scale", "window", "softcap", "sinks")


def _strided_last(t):
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _cu(q_vals, k_vals):
    def mutate(a):
        dev = a["q"].device
        a["cu_seqlens_q"] = None if q_vals is None else torch.tensor(q_vals, device=dev)
        a["cu_seqlens_k"] = None if k_vals is None else torch.tensor(k_vals, device=dev)

    return mutate


def _upd(**fns):
    def mutate(a):
        for name, fn in fns.items():
            a[name] = fn(a)

    return mutate


BAD_CASES = {
    "kv_heads_do_not_divide": (_upd(k=lambda a: torch.randn(12, 3, 32, device=a["q"].device),
                                    v=lambda a: torch.randn(12, 3, 32, device=a["q"].device)), ["k", "q", "v"]),
    "head_dim_mismatch": (_upd(k=lambda a: torch.randn(12, 2, 33, device=a["q"].device)), ["k"]),
    "v_keys_mismatch": (_upd(v=lambda a: torch.randn(13, 2, 32, device=a["q"].device)), ["v"]),
    "v_heads_mismatch": (_upd(v=lambda a: torch.randn(12, 4, 32, device=a["q"].device)), ["v"]),
    "k_dtype": (_upd(k=lambda a: a["k"].half()), ["k"]),
    "v_dtype": (_upd(v=lambda a: a["v"].bfloat16()), ["v"]),
    "all_float64": (_upd(q=lambda a: a["q"].double(), k=lambda a: a["k"].double(), v=lambda a: a["v"].double()),
                    ["q"]),
    "q_2d": (_upd(q=lambda a: a["q"][:, 0]), ["q"]),
    "q_last_dim_strided": (_upd(q=lambda a: _strided_last(a["q"])), ["q"]),
    "k_last_dim_strided": (_upd(k=lambda a: _strided_last(a["k"])), ["k"]),
    "v_last_dim_strided": (_upd(v=lambda a: _strided_last(a["v"])), ["v"]),
    "q_pos_int32": (_upd(q_pos=lambda a: a["q_pos"].int()), ["q_pos"]),
    "q_pos_float": (_upd(q_pos=lambda a: a["q_pos"].float()), ["q_pos"]),
    "q_pos_length": (_upd(q_pos=lambda a: a["q_pos"][:-1]), ["q_pos"]),
    "q_pos_2d": (_upd(q_pos=lambda a: a["q_pos"][None]), ["q_pos"]),
    "kv_pos_int32": (_upd(kv_pos=lambda a: torch.arange(12, dtype=torch.int32, device=a["q"].device)), ["kv_pos"]),
    "kv_pos_length": (_upd(kv_pos=lambda a: torch.arange(11, device=a["q"].device)), ["kv_pos"]),
    "only_cu_seqlens_q": (_cu([0, 2, 5], None), ["cu_seqlens_q", "cu_seqlens_k"]),
    "only_cu_seqlens_k": (_cu(None, [0, 6, 12]), ["cu_seqlens_q", "cu_seqlens_k"]),
    "cu_seqlens_q_not_from_0": (_cu([1, 2, 5], [0, 6, 12]), ["cu_seqlens_q"]),
    "cu_seqlens_q_not_to_nq": (_cu([0, 2, 4], [0, 6, 12]), ["cu_seqlens_q"]),
    "cu_seqlens_k_not_to_nk": (_cu([0, 2, 5], [0, 6, 11]), ["cu_seqlens_k"]),
    "cu_seqlens_k_not_from_0": (_cu([0, 2, 5], [2, 6, 12]), ["cu_seqlens_k"]),
    "cu_seqlens_q_decreasing": (_cu([0, 4, 2, 5], [0, 3, 8, 12]), ["cu_seqlens_q"]),
    "cu_seqlens_k_decreasing": (_cu([0, 2, 3, 5], [0, 8, 3, 12]), ["cu_seqlens_k"]),
    "cu_seqlens_lengths_differ": (_cu([0, 2, 5], [0, 3, 8, 12]), ["cu_seqlens_q", "cu_seqlens_k"]),
    "cu_seqlens_float": (_cu([0.0, 2.0, 5.0], [0, 6, 12]), ["cu_seqlens_q"]),
    "window_0": (_upd(window=lambda a: 0), ["window"]),
    "window_minus_2": (_upd(window=lambda a: -2), ["window"]),
    "softcap_negative": (_upd(softcap=lambda a: -1.0), ["softcap"]),
    "softcap_nan": (_upd(softcap=lambda a: math.nan), ["softcap"]),
    "softcap_inf": (_upd(softcap=lambda a: math.inf), ["softcap"]),
    "sinks_length": (_upd(sinks=lambda a: torch.randn(3, device=a["q"].device)), ["sinks"]),
    "sinks_too_long": (_upd(sinks=lambda a: torch.randn(8, device=a["q"].device)), ["sinks"]),
    "sinks_2d": (_upd(sinks=lambda a: torch.randn(1, 4, device=a["q"].device)), ["sinks"]),
    "sinks_float16": (_upd(sinks=lambda a: torch.randn(4, device=a["q"].device).half()), ["sinks"]),
    "sinks_int64": (_upd(sinks=lambda a: torch.arange(4, device=a["q"].device)), ["sinks"]),
    "scale_nan": (_upd(scale=lambda a: math.nan), ["scale"]),
    "scale_inf": (_upd(scale=lambda a: math.inf), ["scale"]),
    "scale_zero": (_upd(scale=lambda a: 0.0), ["scale"]),
    "scale_negative": (_upd(scale=lambda a: -0.125), ["scale"]),
    # Finite doubles that fp32, where the kernels use them, rounds to 0 or inf.
    "scale_under_fp32": (_upd(scale=lambda a: 1e-46), ["scale"]),
    "scale_over_fp32": (_upd(scale=lambda a: 1e39), ["scale"]),
    "softcap_under_fp32": (_upd(softcap=lambda a: 1e-46), ["softcap"]),
    "softcap_over_fp32": (_upd(softcap=lambda a: 1e39), ["softcap"]),
    "q_no_heads": (_upd(q=lambda a: a["q"][:, :0]), ["q"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_args(device, case):
    ops = impl_module("ops")
    a = base_args(device)
    mutate, names = BAD_CASES[case]
    mutate(a)
    expect_arg_error(lambda: ops.partial_attn(*(a[n] for n in ARG_NAMES)), *names)


# Refused by the real kernels only: what values decide, which a traced call (the fake kernel) cannot see.
VALUE_CASES = {"cu_seqlens_q_not_from_0", "cu_seqlens_q_not_to_nq", "cu_seqlens_k_not_to_nk", "cu_seqlens_k_not_from_0",
               "cu_seqlens_q_decreasing", "cu_seqlens_k_decreasing"}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_args_refused_when_traced(case, dynamic):
    """torch.compile and export run the fake kernel: every bad call that metadata decides fails there, naming the
    argument as the real kernels do, with fixed and with symbolic sizes; the value cases trace and are left to the
    real kernel, which the compiled graph calls."""
    a = base_args("cpu")
    mutate, names = BAD_CASES[case]
    mutate(a)

    def trace():
        return fake_call(impl_module("ops").partial_attn, *(a[n] for n in ARG_NAMES), dynamic=dynamic)

    if case in VALUE_CASES:
        out, lse = trace()
        assert out.shape == a["q"].shape and lse.shape == a["q"].shape[:2]
    else:
        expect_arg_error(trace, *names)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("name", ["k", "v", "q_pos", "sinks"])
def test_bad_device(name):
    ops = impl_module("ops")
    a = base_args("cuda")
    a["sinks"] = torch.randn(4, device="cuda")
    a[name] = a[name].cpu()
    expect_arg_error(lambda: ops.partial_attn(*(a[n] for n in ARG_NAMES)), name)


@pytest.mark.parametrize("name, value", [("window", True), ("window", 2.5), ("softcap", True), ("softcap", "1"),
                                         ("scale", True), ("scale", np.bool_(False))])
def test_scalar_arguments_refuse_bools_and_other_types(name, value):
    """The schema's `int window` and `float softcap` / `float? scale` take True as 1 (window=True ran as a
    one-position window, 2.1 off the default call): the wrapper refuses them by name."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 8, generator=gen) for _ in range(3))
    with pytest.raises(TypeError, match=f"{name}: expected"):
        semshare_ops.partial_attn(q, k, v, torch.arange(6), **{name: value})
    out = semshare_ops.partial_attn(q, k, v, torch.arange(6), scale=np.float32(0.5), window=np.int64(3), softcap=2)[0]
    expected = semshare_ops.partial_attn(q, k, v, torch.arange(6), scale=0.5, window=3, softcap=2.0)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
