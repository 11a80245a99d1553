"""torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT dispatch), a
torch.compile(fullgraph=True) smoke test of the in-place rope_reuse_ feeding partial_attn, and on CUDA: all four ops
captured in a CUDA graph and compiled with mode="reduce-overhead" (kernels on the current stream, no host syncs)."""

import pytest
import torch

from op_testutils import (CUDA, DTYPE_IDS, DTYPES, expect_arg_error, impl_module, make_generator, randint, randn,
                          randperm, tol)

import semshare_ops  # noqa: F401  (registers torch.ops.semshare.*)


def simhash_args(device, dtype=torch.float32):
    gen = make_generator(1)
    return (randn((3, 5, 48), gen=gen, dtype=dtype, device=device), randn((48, 130), gen=gen, device=device))


def hamming_args(device):
    gen = make_generator(2)
    x = randn((40, 32), gen=gen, device=device)
    planes = randn((32, 100), gen=gen, device=device)
    codes = torch.ops.semshare.simhash(x, planes)
    return (codes[:9].clone(), codes, 6)


def rope_args(device, dtype=torch.float32, layers=None):
    gen = make_generator(3)
    lead = () if layers is None else (layers,)
    t_dst, t_src, heads, dim, v_dim, pairs = 14, 11, 2, 32, 16, 7
    src_idx = randperm(t_src, gen=gen, device=device)[:pairs]
    src_idx[0] = -1
    return (
        randn(lead + (t_dst, heads, dim), gen=gen, dtype=dtype, device=device),
        randn(lead + (t_dst, heads, v_dim), gen=gen, dtype=dtype, device=device),
        randn(lead + (t_src, heads, dim), gen=gen, dtype=dtype, device=device),
        randn(lead + (t_src, heads, v_dim), gen=gen, dtype=dtype, device=device),
        src_idx,
        randperm(t_dst, gen=gen, device=device)[:pairs],
        randint(-500, 500, (pairs,), gen=gen, device=device),
        (1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).to(device),
        True,
    )


def attn_args(device, dtype=torch.float32, ragged=False):
    gen = make_generator(4)
    nq, nk = 6, 40
    q = randn((nq, 4, 32), gen=gen, dtype=dtype, device=device)
    k = randn((nk, 2, 32), gen=gen, dtype=dtype, device=device)
    v = randn((nk, 2, 24), gen=gen, dtype=dtype, device=device)
    q_pos = torch.tensor([30, 2, 17, 17, 0, 39], device=device)
    if not ragged:
        return (q, k, v, q_pos)
    kv_pos = torch.arange(nk, device=device) % 25
    kv_pos[::6] = -1
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 15, 40], dtype=torch.int32, device=device)
    return (q, k, v, q_pos, kv_pos, cu_q, cu_k, 0.25)


def attn_feature_args(device, dtype=torch.float32, case="plain"):
    """attn_args with window, softcap and sinks; "head_dim64": head_dim 64 = v_head_dim over 200 keys, which takes the
    tensor-core kernel on CUDA in fp16/bf16 (attn_args' 32/24 take the CUDA-core one)."""
    gen = make_generator(6)
    sinks = (2.0 + torch.randn(4, generator=gen)).to(device)
    if case == "head_dim64":
        q = randn((9, 4, 64), gen=gen, dtype=dtype, device=device) * 3.0
        k = randn((200, 2, 64), gen=gen, dtype=dtype, device=device)
        v = randn((200, 2, 64), gen=gen, dtype=dtype, device=device)
        q_pos = torch.tensor([199, 0, 150, 150, 37, 64, 130, 250, 5], device=device)
        return (q, k, v, q_pos, None, None, None, None, 40, 5.0, sinks)
    base = attn_args(device, dtype, ragged=case == "ragged")
    rest = base[4:] if case == "ragged" else (None, None, None, None)
    return base[:4] + tuple(rest) + (7, 4.0, sinks)


def clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_simhash(device, dtype):
    torch.library.opcheck(torch.ops.semshare.simhash.default, simhash_args(device, dtype))


def test_opcheck_hamming_topk(device):
    torch.library.opcheck(torch.ops.semshare.hamming_topk.default, hamming_args(device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layers", [None, 3], ids=["3d", "4d"])
def test_opcheck_rope_reuse(device, dtype, layers):
    torch.library.opcheck(torch.ops.semshare.rope_reuse_.default, clone_args(rope_args(device, dtype, layers)))


def test_opcheck_rope_reuse_empty_expanded_outputs(device):
    """An empty k_dst / v_dst has no element to share, whatever its strides: the kernels serve it (nothing to write)
    and the fake kernel must agree (it once refused the stride-0 dimension as shared memory)."""
    args = rope_args(device)
    empty = [torch.empty((0, 1, a.shape[-1]), device=device).expand(0, 2, a.shape[-1]) for a in args[:2]]
    none = torch.empty(0, dtype=torch.long, device=device)
    call = tuple(empty) + args[2:4] + (none, none, none) + args[7:]
    torch.ops.semshare.rope_reuse_(*call)
    torch.library.opcheck(torch.ops.semshare.rope_reuse_.default, call)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ragged", [False, True], ids=["plain", "ragged"])
def test_opcheck_partial_attn(device, dtype, ragged):
    torch.library.opcheck(torch.ops.semshare.partial_attn.default, attn_args(device, dtype, ragged))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["plain", "ragged", "head_dim64"])
def test_opcheck_partial_attn_window_softcap_sinks(device, dtype, case):
    torch.library.opcheck(torch.ops.semshare.partial_attn.default, attn_feature_args(device, dtype, case))


def test_compile_fullgraph_matches_eager(device):
    """rope_reuse_ (in place) then partial_attn over the updated cache, compiled with fullgraph=True."""
    ops = impl_module("ops")
    torch._dynamo.reset()
    gen = make_generator(5)
    t, heads, hq, dim = 24, 2, 4, 32
    k_src = randn((t, heads, dim), gen=gen, device=device)
    v_src = randn((t, heads, dim), gen=gen, device=device)
    k_cache = randn((t, heads, dim), gen=gen, device=device)
    v_cache = randn((t, heads, dim), gen=gen, device=device)
    q = randn((5, hq, dim), gen=gen, device=device)
    src_idx = randperm(t, gen=gen, device=device)[:16]
    dst_idx = randperm(t, gen=gen, device=device)[:16]
    delta = randint(-40, 40, (16,), gen=gen, device=device)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).to(device)
    q_pos = torch.tensor([23, 4, 11, 11, 0], device=device)

    def step(k_cache, v_cache):
        ops.rope_reuse_(k_cache, v_cache, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox=True)
        out, lse = ops.partial_attn(q, k_cache, v_cache, q_pos)
        return out * 2.0, lse

    ke, ve = k_cache.clone(), v_cache.clone()
    want_out, want_lse = step(ke, ve)
    kc, vc = k_cache.clone(), v_cache.clone()
    got_out, got_lse = torch.compile(step, fullgraph=True)(kc, vc)
    torch.testing.assert_close(kc, ke, atol=0, rtol=0)  # the in-place update happened in the compiled graph
    torch.testing.assert_close(vc, ve, atol=0, rtol=0)
    assert not torch.equal(kc, k_cache)
    torch.testing.assert_close(got_out, want_out, **tol(torch.float32))
    torch.testing.assert_close(got_lse, want_lse, **tol(torch.float32))


# ---- CUDA graphs ------------------------------------------------------------------------------------------------
# Capture fails if a kernel runs on another stream or the host syncs (an .item(), a copy to or from the host), so
# these check that every op launches on the current stream and that single-sequence calls stay on the device.
# rope_reuse_ checks its index values on the host except while a stream is being captured.

needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available")


def graph_inputs(seed, dtype):
    """Inputs of graph_step; head_dim 64 in fp16/bf16 takes partial_attn's tensor-core kernel, fp32 the other.
    17 queries against 640 keys: two blocks, so the tensor-core kernel splits the keys (workspace and a merge
    kernel inside the graph)."""
    gen = make_generator(100 + seed)
    t, heads, hq, dim, pairs = 640, 2, 6, 64, 40
    return dict(
        k_cache=randn((2, t, heads, dim), gen=gen, dtype=dtype, device="cuda"),
        v_cache=randn((2, t, heads, dim), gen=gen, dtype=dtype, device="cuda"),
        k_src=randn((2, t, heads, dim), gen=gen, dtype=dtype, device="cuda"),
        v_src=randn((2, t, heads, dim), gen=gen, dtype=dtype, device="cuda"),
        src_idx=randperm(t, gen=gen, device="cuda")[:pairs],
        dst_idx=randperm(t, gen=gen, device="cuda")[:pairs],
        delta=randint(-300, 300, (pairs,), gen=gen, device="cuda"),
        inv_freq=(1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).cuda(),
        q=randn((17, hq, dim), gen=gen, dtype=dtype, device="cuda"),
        q_pos=randint(0, t, (17,), gen=gen, device="cuda"),
        x=randn((30, 48), gen=gen, device="cuda"),
        planes=randn((48, 128), gen=gen, device="cuda"),
    )


def graph_step(k_cache, v_cache, k_src, v_src, src_idx, dst_idx, delta, inv_freq, q, q_pos, x, planes):
    """rope_reuse_ into copies of the caches (no input is mutated), partial_attn over the last layer, LSH."""
    k, v = k_cache.clone(), v_cache.clone()
    torch.ops.semshare.rope_reuse_(k, v, k_src, v_src, src_idx, dst_idx, delta, inv_freq, True)
    out, lse = torch.ops.semshare.partial_attn(q, k[1], v[1], q_pos)
    codes = torch.ops.semshare.simhash(x, planes)
    dist, idx = torch.ops.semshare.hamming_topk(codes[:7], codes, 5)
    return k, v, out, lse, codes, dist, idx


def assert_same_results(got, want):
    for name, g, w in zip(("k", "v", "out", "lse", "codes", "dist", "idx"), got, want):
        assert torch.equal(g, w), f"{name} differs from eager"  # the same kernels on the same data


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_refuses_a_bad_call_while_tracing(dynamic):
    """A call the kernels refuse is refused by torch.compile before any graph reaches the backend, naming the
    argument (the fake kernels' checks; every case in the op test files' test_bad_args_refused_when_traced)."""
    ops = impl_module("ops")
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v, q_pos = attn_args("cpu")
    sinks = torch.randn(q.shape[1] + 1)  # one per query head expected

    def attend(q, k, v, q_pos, sinks):
        return ops.partial_attn(q, k, v, q_pos, sinks=sinks)

    compiled = torch.compile(attend, backend=backend, fullgraph=True, dynamic=dynamic)
    expect_arg_error(lambda: compiled(q, k, v, q_pos, sinks), "sinks")
    assert not graphs, "the bad call was compiled"
    compiled(q, k, v, q_pos, sinks[:-1])  # the same call with sinks of the right length compiles and runs
    assert graphs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_capture_replays_on_new_inputs(dtype):
    static = graph_inputs(0, dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        graph_step(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graph_step(**static)
    for seed in (1, 2):
        fresh = graph_inputs(seed, dtype)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.cuda.synchronize()
        want = graph_step(**fresh)
        assert not torch.equal(want[2], graph_step(**graph_inputs(0, dtype))[2])  # the inputs matter
        assert_same_results(static_out, want)


@needs_cuda
def test_cuda_compile_reduce_overhead_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(graph_step, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, recording, then replays of the CUDA graph on new values
        inputs = graph_inputs(seed, torch.bfloat16)
        want = graph_step(**inputs)
        got = [t.clone() for t in compiled(**inputs)]  # a replay's outputs are overwritten by the next one
        assert_same_results(got, want)
    assert not counters["inductor"]["cudagraph_skips"], "the compiled step did not run as a CUDA graph"
