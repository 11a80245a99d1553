"""simhash and hamming_topk (docs/contract.md 3.1, 3.2) against independent numpy oracles, and ops against reference."""

import numpy as np
import pytest
import torch

import semshare_ops

from op_testutils import DTYPE_IDS, DTYPES, expect_arg_error, fake_call, impl_module, make_generator, randn

BITS = [1, 63, 64, 65, 128, 200]


# ---- numpy oracles ---------------------------------------------------------------------------------------------


def np_simhash_bits(x: torch.Tensor, planes: torch.Tensor):
    """(bits [..., B] bool, reliable [..., B] bool): float64 projections; a bit is `reliable` when its projection
    is farther from 0 than any fp32 accumulation error could move it (1e-4 of sum |x_d * p_db|)."""
    xf = x.detach().cpu().to(torch.float64).numpy()
    pf = planes.detach().cpu().to(torch.float64).numpy()
    proj = xf @ pf
    magnitude = np.abs(xf) @ np.abs(pf)
    return proj >= 0, np.abs(proj) > 1e-4 * magnitude


def np_pack(bits_: np.ndarray) -> np.ndarray:
    """Pack bool bits [..., B] into int64 words [..., ceil(B/64)]: bit b -> word b//64, position b%64."""
    nbits = bits_.shape[-1]
    words = (nbits + 63) // 64
    padded = np.zeros(bits_.shape[:-1] + (words * 64,), dtype=bool)
    padded[..., :nbits] = bits_
    packed = np.packbits(padded, axis=-1, bitorder="little")  # [..., words*8] uint8, bit j of byte = bit 8*i+j
    return np.ascontiguousarray(packed).view("<i8").astype(np.int64)


def np_unpack(codes: torch.Tensor) -> np.ndarray:
    """int64 words [..., W] -> bool bits [..., 64*W] (inverse of np_pack)."""
    arr = np.ascontiguousarray(codes.detach().cpu().numpy().astype("<i8"))
    return np.unpackbits(arr.view(np.uint8), axis=-1, bitorder="little").astype(bool)


def np_hamming_topk(q_codes: torch.Tensor, k_codes: torch.Tensor, k: int):
    q = q_codes.cpu().numpy().view(np.uint64)
    r = k_codes.cpu().numpy().view(np.uint64)
    dist = np.bitwise_count(q[:, None, :] ^ r[None, :, :]).sum(-1).astype(np.int64)  # [Nq, Nk]
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # stable: ties keep the smaller reference index
    return np.take_along_axis(dist, order, axis=1), order


def check_simhash(codes: torch.Tensor, x: torch.Tensor, planes: torch.Tensor, min_reliable=0.98):
    nbits = planes.shape[1]
    words = (nbits + 63) // 64
    assert codes.dtype == torch.int64
    assert codes.device == x.device
    assert tuple(codes.shape) == tuple(x.shape[:-1]) + (words,)
    want, reliable = np_simhash_bits(x, planes)
    got = np_unpack(codes)
    assert not got[..., nbits:].any(), "unused high bits of the last word must be 0"
    got = got[..., :nbits]
    assert reliable.mean() >= min_reliable  # the comparison below must cover almost every bit
    mismatch = (got != want) & reliable
    assert not mismatch.any(), f"{mismatch.sum()} reliable bits differ, first at {np.argwhere(mismatch)[0]}"


# ---- simhash ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simhash_matches_numpy(impl, device, dtype, nbits):
    gen = make_generator(100 + nbits)
    D = 96
    x = randn((2, 3, D), gen=gen, dtype=dtype, device=device)
    planes = randn((D, nbits), gen=gen, device=device)
    codes = impl.simhash(x, planes)
    check_simhash(codes, x, planes)


@pytest.mark.parametrize("nbits", [64, 200])
def test_simhash_many_rows_and_1d(impl, device, nbits):
    gen = make_generator(7)
    D = 40
    x = randn((300, D), gen=gen, device=device)
    planes = randn((D, nbits), gen=gen, device=device)
    check_simhash(impl.simhash(x, planes), x, planes)
    # a single vector: [D] -> [W]
    check_simhash(impl.simhash(x[5], planes), x[5], planes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_simhash_large_half_precision_input_on_cpu(dtype):
    """Past 8M elements the CPU kernel widens bf16/fp16 rows to fp32 a block at a time (about 4 MiB: 255 rows of
    4097 features here, so 8 whole blocks and 9 rows) instead of copying the whole input: each row keeps its codes."""
    gen = make_generator(31)
    x = randn((2049, 4097), gen=gen, dtype=dtype)
    planes = randn((4097, 64), gen=gen)
    assert x.numel() > 8 << 20
    check_simhash(impl_module("ops").simhash(x, planes), x, planes)


@pytest.mark.parametrize("impl", ["cuda_emulated"], indirect=True)  # make cuda-emulate runs it too
def test_simhash_rows_beyond_one_launch_are_chunked(impl, monkeypatch):
    """One warp per (row, word), 8 per block, in launches of at most the device's grid.x limit
    (csrc/cuda/launch.cuh): lowered to 2 blocks, 37 rows of 4 words take 10 launches."""
    monkeypatch.setenv("SIMT_EMU_MAX_GRID_X", "2")
    gen = make_generator(12)
    x, planes = randn((37, 24), gen=gen), randn((24, 200), gen=gen)
    check_simhash(impl.simhash(x, planes), x, planes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simhash_strided_view(impl, device, dtype):
    gen = make_generator(11)
    D, nbits = 48, 130
    base = randn((5, 7, D + 9), gen=gen, dtype=dtype, device=device)
    x = base.transpose(0, 1)[:, ::2, 3 : 3 + D]  # [7, 3, D], last dim contiguous, other strides not
    assert not x.is_contiguous() and x.stride(-1) == 1
    planes = randn((D, nbits), gen=gen, device=device)
    codes = impl.simhash(x, planes)
    check_simhash(codes, x, planes)
    # same codes as on a contiguous copy, except possibly for bits within rounding of 0
    want, reliable = np_simhash_bits(x, planes)
    same = (np_unpack(codes)[..., :nbits] == np_unpack(impl.simhash(x.contiguous(), planes))[..., :nbits]) | ~reliable
    assert same.all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simhash_exact_integer_projections(impl, device, dtype):
    """Small-integer data: every projection is exact in fp32, many are exactly 0 (bit must be 1: dot >= 0),
    so the packed words must equal the oracle exactly."""
    rng = np.random.default_rng(5)
    rows, D, nbits = 6, 32, 130
    x = rng.integers(-3, 4, size=(rows, D)).astype(np.float64)
    x[:, -1] = rng.choice([-1.0, 1.0], size=rows)
    p = rng.integers(-3, 4, size=(D, nbits)).astype(np.float64)
    for b in range(0, nbits, 2):  # every other plane is orthogonal to one of the rows
        r = b % rows
        p[-1, b] = -(x[r, :-1] @ p[:-1, b]) * x[r, -1]
    proj = x @ p
    assert (proj == 0).sum() >= nbits // 2 and (proj > 0).any() and (proj < 0).any()
    xt = torch.from_numpy(x).to(dtype=dtype, device=device)
    pt = torch.from_numpy(p).to(dtype=torch.float32, device=device)
    codes = impl.simhash(xt, pt)
    expected = np_pack(proj >= 0)
    np.testing.assert_array_equal(codes.cpu().numpy(), expected)


def test_simhash_high_bit_sets_sign(impl, device):
    """Bit 63 is the sign bit of the int64 word; with all projections positive the first word is -1."""
    gen = make_generator(3)
    D = 16
    x = randn((4, D), gen=gen, device=device)
    planes = randn((D, 65), gen=gen, device=device)
    planes = planes * torch.sign(x[0].cpu().double() @ planes.cpu().double()).to(device=device, dtype=torch.float32)
    _, reliable = np_simhash_bits(x[:1], planes)
    assert reliable.all()
    codes = impl.simhash(x[:1], planes)
    assert codes[0, 0].item() == -1  # all 64 bits set
    assert codes[0, 1].item() == 1  # bit 64 only; unused bits 0


@pytest.mark.parametrize("nbits", [64, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simhash_ops_vs_reference(device, dtype, nbits):
    ops, ref = impl_module("ops"), impl_module("oracle")
    gen = make_generator(21)
    D = 64
    x = randn((4, 50, D), gen=gen, dtype=dtype, device=device)
    planes = randn((D, nbits), gen=gen, device=device)
    a, b = ops.simhash(x, planes), ref.simhash(x, planes)
    assert a.dtype == b.dtype == torch.int64 and a.shape == b.shape
    _, reliable = np_simhash_bits(x, planes)
    agree = (np_unpack(a)[..., :nbits] == np_unpack(b)[..., :nbits]) | ~reliable
    assert agree.all()
    assert (np_unpack(a)[..., nbits:] == 0).all() and (np_unpack(b)[..., nbits:] == 0).all()


def test_simhash_raw_op_registered(device):
    import semshare_ops  # noqa: F401

    gen = make_generator(2)
    x = randn((3, 8), gen=gen, device=device)
    planes = randn((8, 70), gen=gen, device=device)
    check_simhash(torch.ops.semshare.simhash(x, planes), x, planes)


def runner(op, traced):
    """`op` itself, or traced as torch.compile / export trace it (its fake kernel, fixed or symbolic sizes): the fake
    kernel refuses the same calls, naming the same argument."""
    if traced is None:
        return op
    return lambda *args: fake_call(op, *args, dynamic=traced == "dynamic")


TRACED = pytest.mark.parametrize("traced", [None, "static", "dynamic"], ids=["run", "traced", "traced_dynamic"])


@TRACED
def test_simhash_bad_args(device, traced):
    simhash = runner(impl_module("ops").simhash, traced)
    gen = make_generator(4)
    D = 32
    x = randn((5, D), gen=gen, device=device)
    planes = randn((D, 64), gen=gen, device=device)
    expect_arg_error(lambda: simhash(x, planes.double()), "planes")  # planes must be float32
    expect_arg_error(lambda: simhash(x, planes.half()), "planes")
    expect_arg_error(lambda: simhash(x, planes[:-1]), "planes")  # planes rows != D
    expect_arg_error(lambda: simhash(x, planes[:, 0]), "planes")  # planes must be 2-D
    expect_arg_error(lambda: simhash(x.double(), planes), "x")  # activations are fp32/fp16/bf16
    x_nc = randn((5, 2 * D), gen=gen, device=device)[:, ::2]  # last dim stride 2
    assert x_nc.shape[-1] == D and x_nc.stride(-1) == 2
    expect_arg_error(lambda: simhash(x_nc, planes), "x")
    expect_arg_error(lambda: simhash(x[:, :0], planes[:0]), "x")  # no features: named, not a reshape error


# ---- hamming_topk ----------------------------------------------------------------------------------------------


def random_codes(rng, n, words):
    return rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=(n, words), dtype=np.int64, endpoint=True)


def tie_heavy_codes(rng, nq, nk, words):
    """Few distinct reference codes (each repeated many times, some differing from another in one bit) and
    queries that mostly equal or nearly equal them: most candidate distances are tied."""
    pool = random_codes(rng, 4, words)
    pool = np.concatenate([pool, pool[:2] ^ np.int64(1 << 5), pool[:1] ^ np.int64(-(1 << 63))])  # near-duplicates
    k_codes = pool[rng.integers(0, len(pool), size=nk)]
    q_codes = np.concatenate([pool[rng.integers(0, len(pool), size=nq - 2)], random_codes(rng, 2, words)])
    return torch.from_numpy(q_codes), torch.from_numpy(k_codes)


def check_topk(dist, idx, q_codes, k_codes, k):
    nq = q_codes.shape[0]
    assert dist.dtype == torch.int32, dist.dtype
    assert idx.dtype == torch.int64, idx.dtype
    assert tuple(dist.shape) == (nq, k) and tuple(idx.shape) == (nq, k)
    assert dist.device == q_codes.device and idx.device == q_codes.device
    want_d, want_i = np_hamming_topk(q_codes, k_codes, k)
    np.testing.assert_array_equal(idx.cpu().numpy(), want_i)
    np.testing.assert_array_equal(dist.cpu().numpy(), want_d)


@pytest.mark.parametrize("words", [1, 2, 3])
@pytest.mark.parametrize("k", ["1", "5", "Nk"])
def test_hamming_topk_ties(impl, device, words, k):
    rng = np.random.default_rng(words * 100 + {"1": 1, "5": 5, "Nk": 99}[k])
    nq, nk = 13, 41
    q_codes, k_codes = tie_heavy_codes(rng, nq, nk, words)
    kk = nk if k == "Nk" else int(k)
    # the test only has power if the tie rule matters: many equal distances among the first kk+1 candidates
    full_d, _ = np_hamming_topk(q_codes, k_codes, nk)
    assert (np.diff(full_d[:, : min(kk + 1, nk)], axis=1) == 0).any(axis=1).sum() >= nq // 2
    q_codes, k_codes = q_codes.to(device), k_codes.to(device)
    dist, idx = impl.hamming_topk(q_codes, k_codes, kk)
    check_topk(dist, idx, q_codes, k_codes, kk)


@pytest.mark.parametrize("words", [1, 2, 3])
def test_hamming_topk_random(impl, device, words):
    rng = np.random.default_rng(40 + words)
    q_codes = torch.from_numpy(random_codes(rng, 20, words)).to(device)
    k_codes = torch.from_numpy(random_codes(rng, 300, words)).to(device)
    dist, idx = impl.hamming_topk(q_codes, k_codes, 16)
    check_topk(dist, idx, q_codes, k_codes, 16)


def ordered_codes(rng, order, nq, nk, words):
    """Reference codes whose distance to a base code falls (or rises) along the reference index, in steps that tie
    runs of codes; queries: the base code, near copies of it and one random code. Codes that grow nearer along the
    row defeat a selection that keeps a running cut from the codes seen so far."""
    bits = 64 * words
    base = np_unpack(torch.from_numpy(random_codes(rng, 1, words)))
    flips = np.linspace(bits - 1, 0, nk).round().astype(int)  # distance to base, falling
    if order == "rising":
        flips = flips[::-1]
    elif order == "nearest_last":
        flips = np.roll(flips[::-1], -1)
    refs = np.tile(base, (nk, 1))
    for j, f in enumerate(flips):
        refs[j, rng.choice(bits, size=f, replace=False)] ^= True
    queries = np.tile(base, (nq, 1))
    for i in range(1, nq - 1):
        queries[i, rng.choice(bits, size=i, replace=False)] ^= True
    queries[-1] = rng.integers(0, 2, size=bits).astype(bool)
    return torch.from_numpy(np_pack(queries)), torch.from_numpy(np_pack(refs)), flips


@pytest.mark.parametrize("order", ["falling", "rising", "nearest_last"])
@pytest.mark.parametrize("words", [1, 2, 3, 4])
def test_hamming_topk_reference_orders(impl, device, order, words):
    """Whatever the order of the reference codes, and on each side of the CPU kernel's choices (a strided sample
    for the first cut from 256 codes and k <= 16; 64, 128, 256 bits specialised; blocks of 16 with a tail)."""
    rng = np.random.default_rng(300 + words)
    q_codes, k_codes, flips = ordered_codes(rng, order, 5, 1003, words)
    want_d, _ = np_hamming_topk(q_codes[:1], k_codes, 1003)
    assert np.array_equal(np.sort(want_d[0]), np.sort(flips))  # the test has its power: distances as built
    q_codes, k_codes = q_codes.to(device), k_codes.to(device)
    for k in (1, 4, 16, 17):
        dist, idx = impl.hamming_topk(q_codes, k_codes, k)
        check_topk(dist, idx, q_codes, k_codes, k)
        dist, idx = impl.hamming_topk(q_codes, k_codes[:255], k)  # too few codes for the sample
        check_topk(dist, idx, q_codes, k_codes[:255], k)


def test_hamming_topk_many_references(impl, device):
    """Nk and k beyond any small tile or heap size, with heavy ties."""
    rng = np.random.default_rng(61)
    q_codes, k_codes = tie_heavy_codes(rng, 16, 5000, 2)
    q_codes, k_codes = q_codes.to(device), k_codes.to(device)
    dist, idx = impl.hamming_topk(q_codes, k_codes, 700)
    check_topk(dist, idx, q_codes, k_codes, 700)


@pytest.mark.parametrize("impl", ["cuda_emulated"], indirect=True)  # make cuda-emulate runs it too
def test_hamming_topk_queries_beyond_one_launch_are_chunked(impl, monkeypatch):
    """8 queries per block, in launches of at most the device's grid.x limit (csrc/cuda/launch.cuh): lowered to 2
    blocks, 45 strided query rows take 3 launches, each reading and writing its own rows."""
    monkeypatch.setenv("SIMT_EMU_MAX_GRID_X", "2")
    q_all, k_codes = tie_heavy_codes(np.random.default_rng(17), 90, 70, 3)
    q_codes = q_all[::2, :2]  # row stride 6
    k_codes = k_codes[:, :2].contiguous()
    dist, idx = impl.hamming_topk(q_codes, k_codes, 9)
    check_topk(dist, idx, q_codes, k_codes, 9)


@pytest.mark.parametrize("impl", ["cuda_emulated"], indirect=True)  # make cuda-emulate runs it too
def test_hamming_topk_cuda_refuses_more_codes_than_its_counters_hold(impl):
    """The CUDA kernel's distance histogram holds 32-bit counts: 2^31 reference codes (one code expanded, nothing
    allocated) are refused by name before any launch."""
    q_codes = torch.tensor([[0x5A5A]])
    k_codes = torch.tensor([[0x0F0F]]).expand(2**31, 1)
    with pytest.raises(RuntimeError, match="k_codes: the CUDA kernel takes at most 2147483647 codes, got 2147483648"):
        impl.hamming_topk(q_codes, k_codes, 1)


def test_hamming_topk_strided_rows(impl, device):
    rng = np.random.default_rng(8)
    q_all, k_all = tie_heavy_codes(rng, 24, 60, 3)
    q_codes = q_all.to(device)[::2, :2]  # row stride 6, last dim contiguous
    k_codes = k_all.to(device)[1::3, :2]
    assert q_codes.stride(-1) == 1 and not q_codes.is_contiguous()
    dist, idx = impl.hamming_topk(q_codes, k_codes, 7)
    check_topk(dist, idx, q_codes, k_codes, 7)


def test_hamming_topk_on_simhash_codes(impl, device):
    """A query equal to a reference row finds it at distance 0 (the smallest such index on duplicates)."""
    gen = make_generator(9)
    D = 32
    refs = randn((50, D), gen=gen, device=device)
    refs[30] = refs[12]  # duplicate row: ties at distance 0 go to index 12
    planes = randn((D, 128), gen=gen, device=device)
    k_codes = impl.simhash(refs, planes)
    q_codes = k_codes[[12, 3, 49]]
    dist, idx = impl.hamming_topk(q_codes, k_codes, 3)
    assert idx[:, 0].tolist() == [12, 3, 49]
    assert dist[:, 0].tolist() == [0, 0, 0]
    assert idx[0, 1].item() == 30 and dist[0, 1].item() == 0
    check_topk(dist, idx, q_codes, k_codes, 3)


@pytest.mark.parametrize("words", [1, 3])
def test_hamming_topk_ops_vs_reference(device, words):
    ops, ref = impl_module("ops"), impl_module("oracle")
    rng = np.random.default_rng(77)
    q_codes, k_codes = tie_heavy_codes(rng, 30, 257, words)
    q_codes, k_codes = q_codes.to(device), k_codes.to(device)
    for k in (1, 9, 257):
        d1, i1 = ops.hamming_topk(q_codes, k_codes, k)
        d2, i2 = ref.hamming_topk(q_codes, k_codes, k)
        assert torch.equal(d1.cpu(), d2.cpu()) and torch.equal(i1.cpu(), i2.cpu())
        assert d1.dtype == d2.dtype == torch.int32 and i1.dtype == i2.dtype == torch.int64


@TRACED
def test_hamming_topk_bad_args(device, traced):
    hamming_topk = runner(impl_module("ops").hamming_topk, traced)
    rng = np.random.default_rng(1)
    q = torch.from_numpy(random_codes(rng, 4, 2)).to(device)
    r = torch.from_numpy(random_codes(rng, 10, 2)).to(device)
    expect_arg_error(lambda: hamming_topk(q.to(torch.int32), r, 3), "q_codes")
    expect_arg_error(lambda: hamming_topk(q, r.to(torch.int32), 3), "k_codes")
    expect_arg_error(lambda: hamming_topk(q, r[:, :1].contiguous(), 3), "k_codes", "q_codes")  # W mismatch
    expect_arg_error(lambda: hamming_topk(q, r, 0), "k")
    expect_arg_error(lambda: hamming_topk(q, r, 11), "k")
    expect_arg_error(lambda: hamming_topk(q, r, -1), "k")
    expect_arg_error(lambda: hamming_topk(q[0], r, 3), "q_codes")  # must be 2-D
    # 1 to 16 words per code on every device (the CUDA kernel's limit, one contract for both): none, or 17, refused.
    expect_arg_error(lambda: hamming_topk(q[:, :0], r[:, :0], 3), "q_codes")
    wide_q, wide_r = (torch.from_numpy(random_codes(rng, n, 17)).to(device) for n in (4, 10))
    expect_arg_error(lambda: hamming_topk(wide_q, wide_r, 3), "q_codes")
    dist, idx = hamming_topk(wide_q[:, :16], wide_r[:, :16], 3)  # 16 words, 1024 bits: served
    assert dist.shape == idx.shape == (4, 3)


def test_hamming_topk_one_word_codes_of_any_stride(device):
    """A last dim of size 1 is contiguous whatever its stride: [N, 1] columns cut from a wider tensor are served
    (they were refused as "not contiguous"), with the same result as contiguous copies."""
    ops = impl_module("ops")
    rng = np.random.default_rng(2)
    r = torch.from_numpy(random_codes(rng, 9, 3)).to(device)[:, 2:]  # [9, 1], rows 3 words apart
    qt = torch.from_numpy(random_codes(rng, 1, 5)).to(device).t()  # [5, 1] with stride(1) == 5
    assert qt.shape == (5, 1) and qt.stride(1) != 1
    got = ops.hamming_topk(qt, r, 4)
    want = ops.hamming_topk(qt.contiguous(), r.contiguous(), 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("k", [True, np.bool_(True), 1.0, "1"], ids=["bool", "numpy-bool", "float", "str"])
def test_hamming_topk_k_must_be_an_int(k):
    """The schema's `int k` takes True as 1: the wrapper refuses it, as every other int argument of the package."""
    codes = torch.randint(-2**62, 2**62, (5, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="k: expected an int"):
        semshare_ops.hamming_topk(codes, codes, k)
    assert semshare_ops.hamming_topk(codes, codes, np.int64(2))[1].shape == (5, 2)  # a numpy int is an int
