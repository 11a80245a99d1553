"""partial_attn (SPEC.md 3.4) against torch SDPA in float64 with an explicit mask, and ops against reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from op_testutils import (
    CUDA,
    DTYPE_IDS,
    DTYPES,
    EmulatedCudaOps,
    expect_arg_error,
    impl_module,
    make_generator,
    randn,
    tol,
)


LSE_ATOL = 2e-4  # lse is fp32 from fp32 scores for every input dtype; values are O(10)


# ---- oracle -------------------------------------------------------------------------------------------------


def sdpa_reference(q, k, v, q_pos, kv_pos=None, cu_seqlens_q=None, cu_seqlens_k=None, scale=None):
    """float64 (out [Nq, Hq, Dv], lse [Nq, Hq]) via F.scaled_dot_product_attention with a boolean mask
    kv_pos[j] >= 0 & kv_pos[j] <= q_pos[i] per sequence; GQA by repeat_interleave of the kv heads.
    Queries with no visible key: out 0, lse -inf."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    q_pos = q_pos.cpu()
    nq, hq, d = q64.shape
    nk, hkv, _ = k64.shape
    dv = v64.shape[-1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if cu_seqlens_q is None:
        bounds = [(0, nq, 0, nk)]
    else:
        cq, ck = cu_seqlens_q.cpu().tolist(), cu_seqlens_k.cpu().tolist()
        bounds = [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]
    out = torch.zeros(nq, hq, dv, dtype=torch.float64)
    lse = torch.full((nq, hq), -math.inf, dtype=torch.float64)
    for qs, qe, ks, ke in bounds:
        if qe == qs or ke == ks:
            continue
        kp = torch.arange(ke - ks) if kv_pos is None else kv_pos.cpu()[ks:ke]
        mask = (kp[None, :] >= 0) & (kp[None, :] <= q_pos[qs:qe, None])  # [nq_b, nk_b]
        qb = q64[qs:qe].transpose(0, 1)  # [Hq, nq_b, D]
        kb = k64[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, nk_b, D]
        vb = v64[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, nk_b, Dv]
        o = F.scaled_dot_product_attention(qb[None], kb[None], vb[None], attn_mask=mask, scale=scale)[0]
        visible = mask.any(dim=1)
        o = torch.where(visible[None, :, None], o, torch.zeros_like(o))  # SDPA leaves NaN (or 0) on empty rows
        out[qs:qe] = o.transpose(0, 1)
        s = (qb @ kb.transpose(-1, -2)) * scale
        lse[qs:qe] = torch.logsumexp(s.masked_fill(~mask[None], -math.inf), dim=-1).transpose(0, 1)
    return out, lse


def check_attn(out, lse, q, v, ref_out, ref_lse, dtype, out_scale=2.0, min_live=1):
    nq, hq = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    assert out.dtype == q.dtype, out.dtype
    assert lse.dtype == torch.float32, lse.dtype
    assert tuple(out.shape) == (nq, hq, dv), tuple(out.shape)
    assert tuple(lse.shape) == (nq, hq), tuple(lse.shape)
    assert out.device == q.device and lse.device == q.device
    out, lse = out.cpu(), lse.cpu()
    dead = torch.isneginf(ref_lse)
    assert (~dead).sum() >= min_live
    assert torch.equal(torch.isneginf(lse), dead), f"lse == -inf at {torch.isneginf(lse).nonzero().tolist()}, " \
        f"expected at {dead.nonzero().tolist()}"
    assert (out[dead] == 0).all(), "queries without visible keys must give out = 0"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, **tol(dtype, out_scale))
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], atol=LSE_ATOL, rtol=1e-5)


def make_qkv(device, dtype, nq, nk, hq, hkv, d, dv=None, seed=0):
    gen = make_generator(seed)
    dv = d if dv is None else dv
    q = randn((nq, hq, d), gen=gen, dtype=dtype, device=device)
    k = randn((nk, hkv, d), gen=gen, dtype=dtype, device=device)
    v = randn((nk, hkv, dv), gen=gen, dtype=dtype, device=device)
    return q, k, v


def run_check(impl, q, k, v, q_pos, kv_pos=None, cu_q=None, cu_k=None, scale=None, dtype=None, min_live=1):
    dtype = q.dtype if dtype is None else dtype
    out, lse = impl.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale)
    ref_out, ref_lse = sdpa_reference(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale)
    check_attn(out, lse, q, v, ref_out, ref_lse, dtype, min_live=min_live)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ops_vs_reference(device, dtype):
    ops, ref = impl_module("ops"), impl_module("reference")
    for with_kv_pos in (True, False):
        q, k, v, q_pos, kv_pos, cu_q, cu_k = ragged_case(device, dtype, with_kv_pos, seed=21)
        cu_q, cu_k = cu_q.to(device), cu_k.to(device)
        for scale in (None, 0.2):
            a, la = ops.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale)
            b, lb = ref.partial_attn(q, k, v, q_pos, kv_pos, cu_q, cu_k, scale)
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


# ---- bad arguments ------------------------------------------------------------------------------------------------


def base_args(device):
    q, k, v = make_qkv(device, torch.float32, 5, 12, 4, 2, 32, seed=23)
    return dict(q=q, k=k, v=v, q_pos=pos([11, 0, 4, 4, 9], device), kv_pos=None, cu_seqlens_q=None,
                cu_seqlens_k=None, scale=None)


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
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_args(device, case):
    ops = impl_module("ops")
    a = base_args(device)
    mutate, names = BAD_CASES[case]
    mutate(a)
    expect_arg_error(lambda: ops.partial_attn(a["q"], a["k"], a["v"], a["q_pos"], a["kv_pos"], a["cu_seqlens_q"],
                                              a["cu_seqlens_k"], a["scale"]), *names)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("name", ["k", "v", "q_pos"])
def test_bad_device(name):
    ops = impl_module("ops")
    a = base_args("cuda")
    a[name] = a[name].cpu()
    expect_arg_error(lambda: ops.partial_attn(a["q"], a["k"], a["v"], a["q_pos"]), name)

