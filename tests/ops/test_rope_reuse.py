"""rope_reuse_ (docs/contract.md 3.3) against HF transformers' RoPE, independent rotation oracles and the reference."""

import math
import subprocess
import sys

import pytest
import torch

from op_testutils import (
    CUDA,
    DTYPE_IDS,
    DTYPES,
    assert_bits_equal,
    bits,
    expect_arg_error,
    fake_call,
    impl_module,
    make_generator,
    randint,
    randn,
    randperm,
    tol,
)

transformers = pytest.importorskip("transformers")
from transformers import GPTNeoXConfig, LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import (  # noqa: E402
    GPTNeoXRotaryEmbedding,
)
from transformers.models.gpt_neox.modeling_gpt_neox import (  # noqa: E402
    apply_rotary_pos_emb as neox_apply_rotary_pos_emb,  # handles rotary_dim < head_dim
)
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)


# ---- oracles and helpers ---------------------------------------------------------------------------------------


def default_inv_freq(dim, base=10000.0, rotary_dim=None):
    rd = dim if rotary_dim is None else rotary_dim
    return (1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)).to(torch.float32)


def oracle_rotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, neox: bool) -> torch.Tensor:
    """R(delta) k in float64. k: [..., P, H, D] (pairs on dim -3), delta [P], inv_freq [D_rot/2] float32.
    The angle delta*inv_freq is formed in fp32 as the spec says; sin/cos and the rotation are float64.
    neox=True: HF rotate_half on the first rotary_dim dims; neox=False: complex multiplication of (2i, 2i+1)."""
    k = k.detach().cpu().double()
    half = inv_freq.numel()
    rd = 2 * half
    ang = (delta.cpu().to(torch.float32)[:, None] * inv_freq.cpu()[None, :]).double()  # [P, half]
    ang = ang[:, None, :]  # [P, 1, half], broadcasts over heads (and layers in front)
    rot, rest = k[..., :rd], k[..., rd:]
    if neox:
        cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
        sin = torch.cat([ang.sin(), ang.sin()], dim=-1)
        out = rot * cos + rotate_half(rot) * sin
    else:
        c = torch.view_as_complex(rot.reshape(*rot.shape[:-1], half, 2).contiguous())
        out = torch.view_as_real(c * torch.polar(torch.ones_like(ang), ang)).reshape(rot.shape)
    return torch.cat([out, rest], dim=-1)


def angle_atol(max_angle: float, k: torch.Tensor, base: float = 1e-5) -> float:
    """Absolute error allowance: `base` plus a half-ulp fp32 rounding of an angle of size `max_angle`
    (a rotation error of d_theta moves a pair of norm r by r * d_theta)."""
    pair_norm = math.sqrt(2.0) * k.detach().abs().max().item()
    return base + 2.0**-24 * max_angle * pair_norm


def expected_after(dst, src_rows, dst_idx):
    """dst with rows dst_idx[p] replaced by src_rows[p] (dim -3 is the token dim)."""
    out = dst.detach().cpu().clone()
    out[..., dst_idx.cpu(), :, :] = src_rows.cpu()
    return out


def untouched_rows(t_dst: int, dst_idx: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(t_dst, dtype=torch.bool)
    named = dst_idx.cpu()
    keep[named[named >= 0]] = False
    return keep


def make_case(device, *, dtype=torch.float32, layers=None, t_dst=12, t_src=9, heads=3, dim=32, v_dim=24, pairs=6,
              max_delta=50, rotary_dim=None, seed=0):
    gen = make_generator(seed)
    lead = () if layers is None else (layers,)
    a = dict(
        k_dst=randn(lead + (t_dst, heads, dim), gen=gen, dtype=dtype, device=device),
        v_dst=randn(lead + (t_dst, heads, v_dim), gen=gen, dtype=dtype, device=device),
        k_src=randn(lead + (t_src, heads, dim), gen=gen, dtype=dtype, device=device),
        v_src=randn(lead + (t_src, heads, v_dim), gen=gen, dtype=dtype, device=device),
        src_idx=randperm(t_src, gen=gen, device=device)[:pairs],
        dst_idx=randperm(t_dst, gen=gen, device=device)[:pairs],
        delta=randint(-max_delta, max_delta + 1, (pairs,), gen=gen, device=device),
        inv_freq=default_inv_freq(dim, rotary_dim=rotary_dim).to(device),
    )
    return a


def call(impl, a, neox=True):
    return impl.rope_reuse_(
        a["k_dst"], a["v_dst"], a["k_src"], a["v_src"], a["src_idx"], a["dst_idx"], a["delta"], a["inv_freq"],
        neox=neox,
    )


def check_against_oracle(a, before_k, before_v, neox, dtype, extra_tol=1.0):
    """k_dst/v_dst after the call vs the float64 oracle; untouched slots bit-identical; v copied bit-exactly."""
    src_idx, dst_idx, delta = a["src_idx"].cpu(), a["dst_idx"].cpu(), a["delta"].cpu()
    valid = (src_idx >= 0) & (dst_idx >= 0)
    k_src = a["k_src"].detach().cpu()
    v_src = a["v_src"].detach().cpu()
    t_dst = a["k_dst"].shape[-3]
    keep = untouched_rows(t_dst, torch.where(valid, dst_idx, -1))

    k_dst, v_dst = a["k_dst"].detach().cpu(), a["v_dst"].detach().cpu()
    # untouched slots: bit-identical
    assert_bits_equal(k_dst[..., keep, :, :], before_k[..., keep, :, :], "k_dst slots not named in dst_idx")
    assert_bits_equal(v_dst[..., keep, :, :], before_v[..., keep, :, :], "v_dst slots not named in dst_idx")
    s, d = src_idx[valid], dst_idx[valid]
    # v: plain copy, bit-exact
    assert_bits_equal(v_dst[..., d, :, :], v_src[..., s, :, :], "v_dst rows")
    # k: rotation
    want = oracle_rotate(k_src[..., s, :, :], delta[valid], a["inv_freq"], neox)
    got = k_dst[..., d, :, :]
    max_angle = (delta.abs().max().item() if delta.numel() else 0) * a["inv_freq"].abs().max().item()
    t = tol(dtype, extra_tol)
    torch.testing.assert_close(got.double(), want, atol=t["atol"] + angle_atol(max_angle, want, 0.0), rtol=t["rtol"])
    # dims past rotary_dim are copied unchanged
    rd = 2 * a["inv_freq"].numel()
    assert_bits_equal(got[..., rd:], k_src[..., s, :, rd:], "k dims past rotary_dim")


def run_and_check(impl, a, neox=True, dtype=torch.float32, extra_tol=1.0):
    before_k, before_v = a["k_dst"].detach().cpu().clone(), a["v_dst"].detach().cpu().clone()
    src_before = (a["k_src"].detach().cpu().clone(), a["v_src"].detach().cpu().clone())
    ret = call(impl, a, neox)
    assert ret is None
    check_against_oracle(a, before_k, before_v, neox, dtype, extra_tol)
    assert_bits_equal(a["k_src"].cpu(), src_before[0], "k_src must not change")
    assert_bits_equal(a["v_src"].cpu(), src_before[1], "v_src must not change")


# ---- HF transformers: rope types ------------------------------------------------------------------------------


def hf_rope(kind: str):
    """(config, rotary_embedding_module, apply_fn, rope_type) for a small model of the given RoPE flavour."""
    common = dict(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=4096)
    if kind == "default":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return cfg, LlamaRotaryEmbedding(cfg), apply_rotary_pos_emb, "default"
    if kind == "llama3":
        cfg = LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
        return cfg, LlamaRotaryEmbedding(cfg), apply_rotary_pos_emb, "llama3"
    if kind == "yarn":
        cfg = LlamaConfig(**common, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256})
        return cfg, LlamaRotaryEmbedding(cfg), apply_rotary_pos_emb, "yarn"
    if kind == "linear":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
        return cfg, LlamaRotaryEmbedding(cfg), apply_rotary_pos_emb, "linear"
    if kind == "partial":  # GPT-NeoX style: rotary_dim = 0.25 * head_dim = 16 of 64
        cfg = GPTNeoXConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25})
        return cfg, GPTNeoXRotaryEmbedding(cfg), neox_apply_rotary_pos_emb, "default"
    raise ValueError(kind)


def hf_inv_freq(cfg, module, rope_type):
    if rope_type == "default":
        inv_freq, scaling = type(module).compute_default_rope_parameters(cfg)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    assert inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, module.inv_freq, atol=0, rtol=0)
    assert scaling == module.attention_scaling
    return inv_freq


def hf_rotated_keys(module, apply_fn, k_raw, positions):
    """HF post-RoPE keys: k_raw [1, H, T, D] (HF layout), positions [T] -> [1, H, T, D]."""
    cos, sin = module(k_raw, positions[None])
    _, k = apply_fn(k_raw, k_raw, cos, sin)
    return k


@pytest.mark.parametrize("kind", ["default", "llama3", "yarn", "linear", "partial"])
def test_matches_hf_reposition(impl, device, kind):
    """A stored key computed by HF at position j, moved with delta = i - j, equals HF's key at position i.

    HF multiplies cos/sin by `attention_scaling` (yarn: != 1), so every HF key is s * R(pos) k_raw. The stored
    key already holds s; R(i - j) (a pure rotation) applied to s * R(j) k_raw is s * R(i) k_raw: the HF key at i,
    computed with the same scaling. No extra scaling may be applied by the op."""
    cfg, module, apply_fn, rope_type = hf_rope(kind)
    inv_freq = hf_inv_freq(cfg, module, rope_type)
    if kind == "yarn":
        assert module.attention_scaling > 1.05  # the case really exercises attention_scaling
    if kind == "partial":
        assert inv_freq.numel() * 2 == 16
    gen = make_generator(31)
    heads, t, head_dim = 2, 10, 64
    k_raw = randn((1, heads, t, head_dim), gen=gen)
    pos_j = randint(0, 1500, (t,), gen=gen)
    pos_i = randint(0, 1500, (t,), gen=gen)
    pos_i[0], pos_j[0] = pos_j[0], pos_j[0]  # one pair with delta == 0
    k_at_j = hf_rotated_keys(module, apply_fn, k_raw, pos_j)  # what a cache stores
    k_at_i = hf_rotated_keys(module, apply_fn, k_raw, pos_i)  # what a fresh prefill at i would store

    t_dst, v_dim = t + 5, 48
    src_idx = randperm(t, gen=gen)
    dst_idx = randperm(t_dst, gen=gen)[:t]
    delta = pos_i[src_idx] - pos_j[src_idx]
    k_src = k_at_j[0].transpose(0, 1)  # [T, H, D] strided view of the HF layout
    v_src = randn((t, heads, v_dim), gen=gen)
    k_dst = randn((t_dst, heads, head_dim), gen=gen)
    v_dst = randn((t_dst, heads, v_dim), gen=gen)
    k0, v0 = k_dst.clone(), v_dst.clone()
    assert not k_src.is_contiguous() and k_src.stride(-1) == 1
    kd, vd = k_dst.to(device), v_dst.to(device)
    ret = impl.rope_reuse_(kd, vd, k_src.to(device), v_src.to(device), src_idx.to(device), dst_idx.to(device),
                           delta.to(device), inv_freq.to(device), neox=True)
    assert ret is None
    kd, vd = kd.cpu(), vd.cpu()

    want = k_at_i[0].transpose(0, 1)[src_idx]  # [T, H, D]
    max_angle = (pos_i.max() + pos_j.max() + delta.abs().max()).item() * inv_freq.max().item()
    torch.testing.assert_close(kd[dst_idx], want, atol=angle_atol(max_angle, want, 2e-5), rtol=1e-5)
    # the same key (delta == 0 pair) is a bit-exact copy of the stored one
    p0 = (src_idx == 0).nonzero().item()
    assert_bits_equal(kd[dst_idx[p0]], k_src[0], "delta == 0 pair")
    if kind == "partial":
        assert_bits_equal(kd[dst_idx][..., 16:], k_src[src_idx][..., 16:], "dims past rotary_dim")
    assert_bits_equal(vd[dst_idx], v_src[src_idx], "v rows")
    keep = untouched_rows(t_dst, dst_idx)
    assert_bits_equal(kd[keep], k0[keep], "untouched k slots")
    assert_bits_equal(vd[keep], v0[keep], "untouched v slots")


def test_matches_hf_model_cache_shift(impl, device):
    """End to end with a tiny random HF Llama: RoPE attention is shift invariant, so running a prompt at positions
    s..s+T-1 gives (up to fp32 rounding) every layer's cached keys = R(s) * the keys cached at 0..T-1.
    All layers in one [L, T, H, D] launch; values copied."""
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    t, shift = 9, 213
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=make_generator(5))
    with torch.no_grad():
        c0 = model(ids, position_ids=torch.arange(t)[None], use_cache=True).past_key_values
        c1 = model(ids, position_ids=torch.arange(t)[None] + shift, use_cache=True).past_key_values
    layers = cfg.num_hidden_layers
    k_src = torch.stack([c0.layers[i].keys[0].transpose(0, 1) for i in range(layers)])  # [L, T, Hkv, hd]
    v_src = torch.stack([c0.layers[i].values[0].transpose(0, 1) for i in range(layers)])
    k_want = torch.stack([c1.layers[i].keys[0].transpose(0, 1) for i in range(layers)])
    gen = make_generator(6)
    t_dst = t + 4
    k_dst = randn((layers, t_dst, 2, 16), gen=gen)
    v_dst = randn((layers, t_dst, 2, 16), gen=gen)
    k0, v0 = k_dst.clone(), v_dst.clone()
    dst_idx = torch.arange(t) + 4
    kd, vd = k_dst.to(device), v_dst.to(device)
    impl.rope_reuse_(kd, vd, k_src.to(device), v_src.to(device), torch.arange(t, device=device),
                     dst_idx.to(device), torch.full((t,), shift, dtype=torch.int64, device=device),
                     model.model.rotary_emb.inv_freq.to(device))
    kd, vd = kd.cpu(), vd.cpu()
    torch.testing.assert_close(kd[:, 4:], k_want, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(k_src, k_want, atol=1e-2)  # the shift really changed the keys
    assert_bits_equal(vd[:, 4:], v_src, "values")
    assert_bits_equal(kd[:, :4], k0[:, :4], "untouched k")
    assert_bits_equal(vd[:, :4], v0[:, :4], "untouched v")


# ---- independent oracles: neox / interleaved, layouts, head dims ------------------------------------------------


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("layers", [None, 3], ids=["3d", "4d"])
def test_rotation_oracle(impl, device, neox, rotary, layers):
    dim = 64
    a = make_case(device, layers=layers, t_dst=20, t_src=15, heads=3, dim=dim, v_dim=40, pairs=11,
                  max_delta=4000, rotary_dim=None if rotary == "full" else 24, seed=11)
    if rotary == "partial":
        assert a["inv_freq"].numel() == 12
    a["delta"][0], a["delta"][1] = 4000, -4000
    run_and_check(impl, a, neox)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_many_pairs_4d(impl, device, neox):
    a = make_case(device, layers=4, t_dst=700, t_src=600, heads=4, dim=64, v_dim=64, pairs=500, max_delta=3000,
                  seed=27)
    a["dst_idx"][::50] = -1
    run_and_check(impl, a, neox)


STREAM_BYTES = 32 << 20  # csrc/cpu/rope_reuse.cpp kStreamBytes: a call writing more streams its rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_a_call_past_the_streaming_size(dtype, neox):
    """The CPU kernel streams the rows of a call whose pairs write more than 32 MiB (non-temporal stores, 16 bytes
    at a time, where a row starts on a 16-byte boundary). The caches are views with a head stride of 65 elements,
    so some rows are streamed (1 in 4 in fp32, 1 in 8 in bf16) and the others copied; some pairs are copies (delta
    0, bit-exact, -0.0 included), some skipped; the interleaved case rotates only 48 of 64 dims."""
    layers, heads, dim, pairs = 4, 8, 64, 2300 if dtype == torch.float32 else 4600
    a = make_case("cpu", dtype=dtype, layers=layers, t_dst=pairs + 100, t_src=pairs + 50, heads=heads, dim=dim,
                  v_dim=dim, pairs=pairs, max_delta=3000, rotary_dim=None if neox else 48, seed=41)
    a["delta"][::7] = 0
    a["dst_idx"][::50] = -1
    written = int(((a["src_idx"] >= 0) & (a["dst_idx"] >= 0)).sum()) * layers * heads * 2 * dim * dtype.itemsize
    assert written > STREAM_BYTES  # the test has its power
    for name in ("k_dst", "v_dst"):  # the same values, laid out with 65 elements per head
        padded = torch.zeros(a[name].shape[:-1] + (dim + 1,), dtype=dtype)
        padded[..., :dim] = a[name]
        a[name] = padded[..., :dim]
    assert a["k_dst"].stride(-2) == dim + 1
    copies = (a["delta"] == 0) & (a["dst_idx"] >= 0)
    a["k_src"][:, a["src_idx"][copies], :, ::5] = -0.0
    run_and_check(impl_module("ops"), a, neox, dtype)
    assert_bits_equal(a["k_dst"][:, a["dst_idx"][copies]], a["k_src"][:, a["src_idx"][copies]], "delta-0 key rows")


@pytest.mark.parametrize("kernel, dims", [("vec", (32, 24)), ("scalar", (30, 22))])
@pytest.mark.parametrize("impl", ["cuda_emulated"], indirect=True)  # make cuda-emulate runs it too
def test_pairs_beyond_one_launch_are_chunked(impl, monkeypatch, kernel, dims):
    """One block per pair, in launches of at most the device's grid.x limit (csrc/cuda/launch.cuh): with the
    emulated limit lowered to 4 blocks, 11 pairs take three launches, each reading its own slice of the index
    tensors (a skipped pair in the second). Dims 32 / 24 take the 16-byte-chunk kernel; 30 / 22 the element-wise
    one (half the rotary dim, 15, is not a whole number of fp32's 4-element chunks)."""
    monkeypatch.setenv("SIMT_EMU_MAX_GRID_X", "4")
    dim, v_dim = dims
    a = make_case("cpu", layers=2, t_dst=15, t_src=13, dim=dim, v_dim=v_dim, pairs=11, max_delta=900, seed=31)
    a["dst_idx"][5] = -1
    run_and_check(impl, a)


def test_neox_and_interleaved_differ(impl, device):
    """Guard against a kernel ignoring `neox`: the two pairings give different keys."""
    a = make_case(device, seed=12)
    b = {k: (v.clone() if k in ("k_dst", "v_dst") else v) for k, v in a.items()}
    call(impl, a, True)
    call(impl, b, False)
    assert not torch.allclose(a["k_dst"], b["k_dst"], atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dtypes_oracle(impl, device, dtype):
    a = make_case(device, dtype=dtype, layers=2, heads=4, dim=128, v_dim=64, pairs=8, max_delta=4000, seed=13)
    run_and_check(impl, a, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_hf_cache_views(impl, device, dtype):
    """An HF cache [B, H, S, D] passed as cache[b].transpose(0, 1) ([S, H, D], non-contiguous, last dim
    contiguous), for both source and destination; other batch rows of the destination cache stay untouched."""
    gen = make_generator(14)
    batch, heads, s_src, s_dst, dim, v_dim = 2, 3, 11, 16, 32, 16
    src_k = randn((batch, heads, s_src, dim), gen=gen, dtype=dtype, device=device)
    src_v = randn((batch, heads, s_src, v_dim), gen=gen, dtype=dtype, device=device)
    dst_k = randn((batch, heads, s_dst, dim), gen=gen, dtype=dtype, device=device)
    dst_v = randn((batch, heads, s_dst, v_dim), gen=gen, dtype=dtype, device=device)
    dst_k0, dst_v0 = dst_k.cpu().clone(), dst_v.cpu().clone()
    a = dict(
        k_dst=dst_k[0].transpose(0, 1), v_dst=dst_v[0].transpose(0, 1),
        k_src=src_k[1].transpose(0, 1), v_src=src_v[1].transpose(0, 1),
        src_idx=randperm(s_src, gen=gen, device=device)[:7], dst_idx=randperm(s_dst, gen=gen, device=device)[:7],
        delta=randint(-300, 300, (7,), gen=gen, device=device), inv_freq=default_inv_freq(dim).to(device),
    )
    assert not a["k_dst"].is_contiguous() and a["k_dst"].stride(-1) == 1
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    check_against_oracle(a, before_k, before_v, True, dtype)
    assert_bits_equal(dst_k[1].cpu(), dst_k0[1], "other batch row of the k cache")
    assert_bits_equal(dst_v[1].cpu(), dst_v0[1], "other batch row of the v cache")


def test_static_cache_prefix_views(impl, device):
    """A preallocated (HF StaticCache-like) cache [B, H, S_max, D] used up to T < S_max: the views
    cache[b, :, :T].transpose(0, 1) are neither contiguous nor dense, but their last dim is contiguous, which
    is all docs/contract.md 3 asks ("other strides are free")."""
    gen = make_generator(26)
    batch, heads, s_max, t, t_src, dim = 2, 3, 32, 12, 9, 32
    k_cache = randn((batch, heads, s_max, dim), gen=gen, device=device)
    v_cache = randn((batch, heads, s_max, dim), gen=gen, device=device)
    k_cache0, v_cache0 = k_cache.cpu().clone(), v_cache.cpu().clone()
    a = dict(
        k_dst=k_cache[1, :, :t].transpose(0, 1), v_dst=v_cache[1, :, :t].transpose(0, 1),
        k_src=randn((t_src, heads, dim), gen=gen, device=device), v_src=randn((t_src, heads, dim), gen=gen, device=device),
        src_idx=randperm(t_src, gen=gen, device=device)[:6], dst_idx=randperm(t, gen=gen, device=device)[:6],
        delta=randint(-99, 99, (6,), gen=gen, device=device), inv_freq=default_inv_freq(dim).to(device),
    )
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    check_against_oracle(a, before_k, before_v, True, torch.float32)
    assert_bits_equal(k_cache[0].cpu(), k_cache0[0], "other batch row")
    assert_bits_equal(k_cache[1, :, t:].cpu(), k_cache0[1, :, t:], "slots past T")
    assert_bits_equal(v_cache[1, :, t:].cpu(), v_cache0[1, :, t:], "slots past T")


def test_layer_and_head_slices_as_views(impl, device):
    """4-D caches given as views of bigger buffers (a head-dim slice with last-dim stride 1, a layer stride)."""
    gen = make_generator(15)
    layers, t, heads, dim = 2, 10, 2, 32
    big_k = randn((layers * 2, t, heads, dim + 8), gen=gen, device=device)
    big_v = randn((layers, t, heads + 1, 20), gen=gen, device=device)
    a = dict(
        k_dst=big_k[::2, :, :, 4 : 4 + dim], v_dst=big_v[:, :, 1:],
        k_src=randn((layers, t, heads, dim), gen=gen, device=device),
        v_src=randn((layers, t, heads, 20), gen=gen, device=device),
        src_idx=randperm(t, gen=gen, device=device)[:6], dst_idx=randperm(t, gen=gen, device=device)[:6],
        delta=randint(-99, 99, (6,), gen=gen, device=device), inv_freq=default_inv_freq(dim).to(device),
    )
    big_k0, big_v0 = big_k.cpu().clone(), big_v.cpu().clone()
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    check_against_oracle(a, before_k, before_v, True, torch.float32)
    assert_bits_equal(big_k[1::2].cpu(), big_k0[1::2], "layers outside the view")
    assert_bits_equal(big_k[..., :4].cpu(), big_k0[..., :4], "head dims before the view")
    assert_bits_equal(big_k[..., 4 + dim :].cpu(), big_k0[..., 4 + dim :], "head dims after the view")
    assert_bits_equal(big_v[:, :, :1].cpu(), big_v0[:, :, :1], "head outside the view")


# ---- bit-exact copies, untouched slots, skips -----------------------------------------------------------------


def with_special_values(t: torch.Tensor, gen, specials) -> torch.Tensor:
    flat = t.detach().cpu().reshape(-1).clone()
    pos = torch.randperm(flat.numel(), generator=gen)[: len(specials) * 4]
    vals = torch.tensor(specials * 4, dtype=torch.float32).to(t.dtype)
    flat[pos] = vals
    return flat.reshape(t.shape).to(t.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layers", [None, 2], ids=["3d", "4d"])
def test_delta_zero_is_bit_exact_copy(impl, device, dtype, layers):
    a = make_case(device, dtype=dtype, layers=layers, t_dst=14, t_src=14, pairs=10, seed=16)
    gen = make_generator(17)
    tiny = {torch.float32: 1e-40, torch.float16: 3e-6, torch.bfloat16: 1e-40}[dtype]  # subnormals
    specials = [-0.0, 0.0, -0.0, tiny, -tiny, 1e4, -3e4, 6.1e-5, -1.0e-3]
    a["k_src"] = with_special_values(a["k_src"], gen, specials)
    a["v_src"] = with_special_values(a["v_src"], gen, specials)
    assert (bits(a["k_src"].cpu()) == bits(torch.tensor(-0.0, dtype=dtype))).any()
    a["delta"] = torch.zeros_like(a["delta"])
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    want_k = expected_after(before_k, a["k_src"].cpu()[..., a["src_idx"].cpu(), :, :], a["dst_idx"])
    want_v = expected_after(before_v, a["v_src"].cpu()[..., a["src_idx"].cpu(), :, :], a["dst_idx"])
    assert_bits_equal(a["k_dst"].cpu(), want_k, "k_dst with delta == 0")
    assert_bits_equal(a["v_dst"].cpu(), want_v, "v_dst")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_delta_zero_pairs_exact_among_rotated(impl, device, dtype, neox):
    """Mixed deltas: the pairs with delta == 0 are bit-exact copies (incl. -0.0), the others rotate."""
    a = make_case(device, dtype=dtype, t_dst=16, t_src=16, pairs=12, max_delta=500, seed=18)
    a["delta"][::3] = 0
    # -0.0 at every fifth dim of each delta == 0 source row (both halves of every rotation pair layout): rotated by
    # 0 anyway, x cos 0 -+ y sin 0 turns -0.0 into +0.0 wherever its partner y has the wrong sign, about half of them.
    planted = a["src_idx"][a["delta"] == 0]
    a["k_src"][planted, :, ::5] = -0.0
    assert (bits(a["k_src"].cpu()) == bits(torch.tensor(-0.0, dtype=dtype))).sum() >= 4 * 3 * 7
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, neox)
    check_against_oracle(a, before_k, before_v, neox, dtype)
    zero = (a["delta"] == 0).cpu()
    s, d = a["src_idx"].cpu()[zero], a["dst_idx"].cpu()[zero]
    assert_bits_equal(a["k_dst"].cpu()[d], a["k_src"].cpu()[s], "delta == 0 pairs")


def test_delta_zero_copies_inf_and_nan(impl, device):
    """'With delta == 0 the op is a bit-exact copy' also for inf and NaN (cos/sin arithmetic would give NaN)."""
    a = make_case(device, t_dst=10, t_src=10, pairs=8, seed=20)
    a["k_src"] = with_special_values(a["k_src"], make_generator(21), [float("inf"), float("-inf"), float("nan")])
    a["delta"] = torch.zeros_like(a["delta"])
    before_k = a["k_dst"].cpu().clone()
    call(impl, a, True)
    want_k = expected_after(before_k, a["k_src"].cpu()[a["src_idx"].cpu()], a["dst_idx"])
    assert_bits_equal(a["k_dst"].cpu(), want_k, "k_dst")


@pytest.mark.parametrize("layers", [None, 2], ids=["3d", "4d"])
def test_negative_indices_skip_pairs(impl, device, layers):
    a = make_case(device, layers=layers, t_dst=12, t_src=10, pairs=8, max_delta=200, seed=22)
    a["src_idx"][1] = -1
    a["src_idx"][4] = -7
    a["dst_idx"][2] = -1
    a["dst_idx"][5] = -1  # several -1 in dst_idx are fine (only non-negative entries must be unique)
    a["dst_idx"][6] = -3
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    check_against_oracle(a, before_k, before_v, True, torch.float32)
    # the slot whose pair has src_idx < 0 keeps its old contents
    for p in (1, 4):
        d = a["dst_idx"][p].item()
        assert_bits_equal(a["k_dst"].cpu()[..., d, :, :], before_k[..., d, :, :], f"dst slot of skipped pair {p}")
        assert_bits_equal(a["v_dst"].cpu()[..., d, :, :], before_v[..., d, :, :], f"dst slot of skipped pair {p}")


def test_all_pairs_skipped_and_empty(impl, device):
    a = make_case(device, pairs=4, seed=23)
    a["src_idx"][:] = -1
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    call(impl, a, True)
    assert_bits_equal(a["k_dst"].cpu(), before_k, "k_dst")
    assert_bits_equal(a["v_dst"].cpu(), before_v, "v_dst")
    empty = torch.empty(0, dtype=torch.int64, device=device)
    a.update(src_idx=empty, dst_idx=empty.clone(), delta=empty.clone())
    call(impl, a, True)
    assert_bits_equal(a["k_dst"].cpu(), before_k, "k_dst")
    assert_bits_equal(a["v_dst"].cpu(), before_v, "v_dst")


def test_raw_op_registered(device):
    import semshare_ops  # noqa: F401

    a = make_case(device, seed=24)
    before_k, before_v = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    ret = torch.ops.semshare.rope_reuse_(a["k_dst"], a["v_dst"], a["k_src"], a["v_src"], a["src_idx"],
                                         a["dst_idx"], a["delta"], a["inv_freq"], False)
    assert ret is None
    check_against_oracle(a, before_k, before_v, False, torch.float32)


# ---- ops vs reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("layers", [None, 3], ids=["3d", "4d"])
def test_ops_vs_reference(device, dtype, neox, layers):
    ops, ref = impl_module("ops"), impl_module("oracle")
    a = make_case(device, dtype=dtype, layers=layers, t_dst=40, t_src=33, heads=4, dim=128, v_dim=96, pairs=30,
                  max_delta=4000, seed=25)
    a["delta"][:4] = torch.tensor([4000, -4000, 0, 1], device=device)
    a["src_idx"][5] = -1
    a["dst_idx"][7] = -1
    b = {k: (v.clone() if k in ("k_dst", "v_dst") else v) for k, v in a.items()}
    call(ops, a, neox)
    call(ref, b, neox)
    assert_bits_equal(a["v_dst"].cpu(), b["v_dst"].cpu(), "v_dst ops vs reference")
    max_angle = 4000 * a["inv_freq"].max().item()
    t = tol(dtype)
    torch.testing.assert_close(a["k_dst"].double(), b["k_dst"].double(),
                               atol=t["atol"] + angle_atol(max_angle, a["k_src"].double(), 0.0), rtol=t["rtol"])


# ---- bad arguments ------------------------------------------------------------------------------------------------


def _noncontig_last(t):
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _overlap_k(a):
    buf = torch.randn((a["k_dst"].shape[0] + 2,) + tuple(a["k_dst"].shape[1:]), device=a["k_dst"].device)
    a["k_dst"] = buf[: a["k_dst"].shape[0]]
    a["k_src"] = buf[2 : 2 + a["k_src"].shape[0]]


def _overlap_v(a):
    buf = torch.randn((a["v_dst"].shape[0] + 1,) + tuple(a["v_dst"].shape[1:]), device=a["v_dst"].device)
    a["v_dst"] = buf[: a["v_dst"].shape[0]]
    a["v_src"] = buf[1 : 1 + a["v_src"].shape[0]]


def _set(name, fn):
    def mutate(a):
        a[name] = fn(a[name])

    return mutate


def _set_item(name, i, value):
    def mutate(a):
        t = a[name].clone()
        t[i] = value if not callable(value) else value(a)
        a[name] = t

    return mutate


def _heads(t, n):
    return torch.randn(t.shape[:-2] + (n, t.shape[-1]), device=t.device, dtype=t.dtype)


def _last(t, n):
    return torch.randn(t.shape[:-1] + (n,), device=t.device, dtype=t.dtype)


BAD_CASES = {
    # dtypes
    "k_dst_float64": (_set("k_dst", lambda t: t.double()), ["k_dst"]),
    "k_src_dtype": (_set("k_src", lambda t: t.half()), ["k_src"]),
    "v_src_dtype": (_set("v_src", lambda t: t.bfloat16()), ["v_src"]),
    "v_dst_dtype": (_set("v_dst", lambda t: t.half()), ["v_dst"]),
    "src_idx_int32": (_set("src_idx", lambda t: t.int()), ["src_idx"]),
    "dst_idx_int32": (_set("dst_idx", lambda t: t.int()), ["dst_idx"]),
    "delta_int32": (_set("delta", lambda t: t.int()), ["delta"]),
    "delta_float": (_set("delta", lambda t: t.float()), ["delta"]),
    "inv_freq_float64": (_set("inv_freq", lambda t: t.double()), ["inv_freq"]),
    # lengths and index values
    "src_idx_length": (_set("src_idx", lambda t: torch.cat([t, t[:1]])), ["src_idx"]),
    "dst_idx_length": (_set("dst_idx", lambda t: t[:-1]), ["dst_idx"]),
    "delta_length": (_set("delta", lambda t: torch.cat([t, t[:2]])), ["delta"]),
    "src_idx_2d": (_set("src_idx", lambda t: t[None]), ["src_idx"]),
    "src_idx_out_of_range": (_set_item("src_idx", 2, lambda a: a["k_src"].shape[-3]), ["src_idx"]),
    "dst_idx_out_of_range": (_set_item("dst_idx", 0, lambda a: a["k_dst"].shape[-3]), ["dst_idx"]),
    "dst_idx_duplicate": (_set_item("dst_idx", 3, lambda a: a["dst_idx"][1].item()), ["dst_idx"]),
    "inv_freq_too_long": (_set("inv_freq", lambda t: torch.cat([t, t[-1:]])), ["inv_freq"]),
    "inv_freq_2d": (_set("inv_freq", lambda t: t[None]), ["inv_freq"]),
    # shapes
    "k_src_heads": (_set("k_src", lambda t: _heads(t, t.shape[-2] + 1)), ["k_src"]),
    "v_src_heads": (_set("v_src", lambda t: _heads(t, t.shape[-2] - 1)), ["v_src"]),
    "v_dst_heads": (_set("v_dst", lambda t: _heads(t, t.shape[-2] + 2)), ["v_dst"]),
    "k_src_head_dim": (_set("k_src", lambda t: _last(t, t.shape[-1] + 2)), ["k_src"]),
    "v_src_head_dim": (_set("v_src", lambda t: _last(t, t.shape[-1] + 2)), ["v_src"]),
    "v_dst_tokens": (_set("v_dst", lambda t: torch.randn((t.shape[0] + 1,) + t.shape[1:], device=t.device)),
                     ["v_dst"]),
    "v_src_tokens": (_set("v_src", lambda t: torch.randn((t.shape[0] - 1,) + t.shape[1:], device=t.device)),
                     ["v_src"]),
    "k_dst_2d": (_set("k_dst", lambda t: t[0]), ["k_dst"]),
    "k_src_4d": (_set("k_src", lambda t: t[None].expand(2, *t.shape).contiguous()), ["k_src"]),
    # memory layout
    "k_src_last_dim_strided": (_set("k_src", _noncontig_last), ["k_src"]),
    "k_dst_last_dim_strided": (_set("k_dst", _noncontig_last), ["k_dst"]),
    "v_dst_last_dim_strided": (_set("v_dst", _noncontig_last), ["v_dst"]),
    "k_src_is_k_dst": (lambda a: a.update(k_src=a["k_dst"], v_src=torch.randn(
        a["k_dst"].shape[:-1] + (a["v_src"].shape[-1],), device=a["k_dst"].device)), ["k_dst", "k_src"]),
    "k_src_overlaps_k_dst": (_overlap_k, ["k_dst", "k_src"]),
    "v_src_overlaps_v_dst": (_overlap_v, ["v_dst", "v_src"]),
    # an output whose elements share memory (one token row expanded over all): named, not ATen's generic message
    "k_dst_expanded": (_set("k_dst", lambda t: t[:1].expand(t.shape)), ["k_dst"]),
    "v_dst_expanded_heads": (_set("v_dst", lambda t: t[:, :1].expand(t.shape)), ["v_dst"]),
    # rows that overlap without a zero stride (token stride = one head's row): ATen cannot decide it, the kernels do
    "k_dst_rows_overlap": (_set("k_dst", lambda t: t.as_strided(t.shape, (t.shape[-1], t.shape[-1], 1))), ["k_dst"]),
}

BAD_CASES_4D = {
    "k_src_layers": (_set("k_src", lambda t: torch.randn((t.shape[0] + 1,) + t.shape[1:], device=t.device)),
                     ["k_src"]),
    "v_dst_layers": (_set("v_dst", lambda t: t[:1]), ["v_dst"]),
    "dst_idx_out_of_range": (_set_item("dst_idx", 0, lambda a: a["k_dst"].shape[-3]), ["dst_idx"]),
    "k_src_heads": (_set("k_src", lambda t: _heads(t, t.shape[-2] + 1)), ["k_src"]),
}


def _check_bad(device, mutate, names, layers=None):
    ops = impl_module("ops")
    a = make_case(device, layers=layers, t_dst=12, t_src=9, pairs=6, seed=30)
    mutate(a)
    k_before, v_before = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    expect_arg_error(lambda: call(ops, a, True), *names)
    assert_bits_equal(a["k_dst"].cpu(), k_before, "k_dst after a rejected call")
    assert_bits_equal(a["v_dst"].cpu(), v_before, "v_dst after a rejected call")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_args(device, case):
    mutate, names = BAD_CASES[case]
    _check_bad(device, mutate, names)


@pytest.mark.parametrize("case", list(BAD_CASES_4D))
def test_bad_args_4d(device, case):
    mutate, names = BAD_CASES_4D[case]
    _check_bad(device, mutate, names, layers=2)


@pytest.mark.parametrize("neox", [None, 0, 1, "yes"], ids=["None", "0", "1", "str"])
def test_neox_must_be_a_bool(device, neox):
    """The op's `bool neox` takes None (and 0 or 1) without complaint, None as False: the wrapper refuses all but a
    bool, before the caches are touched."""
    a = make_case(device, seed=31)
    k_before, v_before = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    with pytest.raises(TypeError, match=f"neox: expected a bool, got {type(neox).__name__}"):
        call(impl_module("ops"), a, neox)
    assert_bits_equal(a["k_dst"].cpu(), k_before, "k_dst after a rejected call")
    assert_bits_equal(a["v_dst"].cpu(), v_before, "v_dst after a rejected call")


def test_inference_tensor_outputs_are_refused_before_anything_is_written(device):
    """Caches made under torch.inference_mode() and updated outside it: the version bump after the kernel refused
    them (torch's rule), but only once k_dst and v_dst were written. Refused first now, naming k_dst, nothing
    written; under inference_mode the call runs."""
    with torch.inference_mode():
        a = make_case(device, seed=33)
    a = {name: t if name in ("k_dst", "v_dst") else t.clone() for name, t in a.items()}  # sources: normal tensors
    k_before, v_before = a["k_dst"].cpu().clone(), a["v_dst"].cpu().clone()
    with pytest.raises(RuntimeError, match="rope_reuse_: k_dst is an inference tensor"):
        call(impl_module("ops"), a)
    assert_bits_equal(a["k_dst"].cpu(), k_before, "k_dst after a rejected call")
    assert_bits_equal(a["v_dst"].cpu(), v_before, "v_dst after a rejected call")
    with torch.inference_mode():
        call(impl_module("ops"), a)
    assert not torch.equal(a["k_dst"].cpu(), k_before)


# Refused by the real kernels only: what index values decide, which a traced call (the fake kernel) cannot see.
VALUE_CASES = {"src_idx_out_of_range", "dst_idx_out_of_range", "dst_idx_duplicate"}
# Decided from strides and storage offsets the fake kernel sees as numbers only with fixed sizes (symbolic ones would
# have to be compared by guards): refused there, and under symbolic sizes left to the real kernel.
FIXED_SIZE_CASES = {"k_dst_rows_overlap", "k_src_is_k_dst", "k_src_overlaps_k_dst", "v_src_overlaps_v_dst"}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", [(3, c) for c in BAD_CASES] + [(4, c) for c in BAD_CASES_4D],
                         ids=lambda c: f"{c[0]}d-{c[1]}")
def test_bad_args_refused_when_traced(case, dynamic):
    """torch.compile and export run the fake kernel: every bad call that metadata decides fails there, naming the
    argument as the real kernels do, with fixed and with symbolic sizes; the value cases trace and are left to the
    real kernel, which the compiled graph calls."""
    nd, name = case
    a = make_case("cpu", layers=2 if nd == 4 else None, t_dst=12, t_src=9, pairs=6, seed=30)
    mutate, names = (BAD_CASES if nd == 3 else BAD_CASES_4D)[name]
    mutate(a)

    def trace():
        return fake_call(lambda *args: call(impl_module("ops"), dict(zip(a, args))), *a.values(), dynamic=dynamic)

    if name in VALUE_CASES or (dynamic and name in FIXED_SIZE_CASES):
        trace()
    else:
        expect_arg_error(trace, *names)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("name", ["src_idx", "dst_idx", "delta", "inv_freq", "k_src", "v_dst"])
def test_bad_device(name):
    _check_bad("cuda", _set(name, lambda t: t.cpu()), [name])


# ---- outputs whose dimensions interleave in memory: served where no two elements share an address -----------------


def _interleaved(t, seed):
    """`t` ([T, 2, D]) as a view whose token and head strides interleave (2 and 3 rows of D): no two elements share
    an address (2t + 3h is never 2t'), but the strides do not nest, so only listing the offsets can tell."""
    tokens, heads, dim = t.shape
    assert heads == 2
    buf = randn(((2 * (tokens - 1) + 3 * (heads - 1) + 1) * dim,), gen=make_generator(seed), device=t.device)
    out = buf.as_strided(t.shape, (2 * dim, 3 * dim, 1))
    out.copy_(t)
    return out


def test_interleaved_outputs_are_served(device):
    """A k_dst / v_dst view whose strides interleave without overlapping (ATen's overlap test gives up on it) gets
    the answer the same call gives on contiguous outputs, bit for bit, and the memory between its rows is left as
    it was."""
    ops = impl_module("ops")
    a = make_case(device, t_dst=12, t_src=9, heads=2, pairs=6, seed=31)
    b = dict(a, k_dst=_interleaved(a["k_dst"], 1), v_dst=_interleaved(a["v_dst"], 2))
    gaps = [t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).clone()
            for t in (b["k_dst"], b["v_dst"])]
    call(ops, a, True)
    call(ops, b, True)
    for name, gap in zip(("k_dst", "v_dst"), gaps):
        assert_bits_equal(b[name], a[name], name)
        whole = b[name].as_strided(gap.shape, (1,), 0)
        written = torch.zeros(gap.shape, dtype=torch.bool, device=device)
        written.as_strided(b[name].shape, b[name].stride(), 0).fill_(True)
        assert_bits_equal(whole[~written], gap[~written], f"{name}: memory between its rows")


@pytest.mark.parametrize("traced", [False, True], ids=["kernel", "traced"])
def test_interleaved_outputs_too_large_to_list_are_refused(device, traced):
    """Past 2^20 elements the offsets of an interleaved output are not listed: refused by name, with what to pass
    instead, before any write; the fake kernel refuses it too (fixed sizes)."""
    if traced and device != "cpu":
        pytest.skip("the fake kernel is device-independent")
    a = make_case(device, t_dst=4100, t_src=9, heads=2, dim=128, v_dim=8, pairs=6, seed=32)
    a["k_dst"] = _interleaved(a["k_dst"], 3)
    assert a["k_dst"].numel() > 1 << 20
    before = a["k_dst"].clone()
    if traced:
        err = expect_arg_error(lambda: fake_call(lambda *args: call(impl_module("ops"), dict(zip(a, args))),
                                                 *a.values()), "k_dst")
    else:
        err = expect_arg_error(lambda: call(impl_module("ops"), a, True), "k_dst")
    assert "interleave" in str(err) and "contiguous" in str(err), str(err)
    assert_bits_equal(a["k_dst"], before, "k_dst after a rejected call")


# ---- inputs that alias an output: refused before any write (in a child process: before this check, one crashed) ---

_ALIAS_CASES = {
    # an index that the kernel's own writes would change after it was checked: out-of-bounds writes
    "dst_idx": """
buf = torch.zeros(4096, dtype=torch.int64)
k_dst = buf.view(torch.float32)[: 2 * 16 * 8].view(16, 2, 8)
dst_idx = buf[:4]""",
    "src_idx": """
buf = torch.zeros(4096, dtype=torch.int64)
k_dst = buf.view(torch.float32)[: 2 * 16 * 8].view(16, 2, 8)
src_idx = buf[4:8]""",
    "delta": """
buf = torch.zeros(4096, dtype=torch.int64)
v_dst = buf.view(torch.float32)[: 2 * 16 * 8].view(16, 2, 8)
delta = buf[8:12]""",
    # frequencies the kernel overwrites: later pairs rotate by the wrong angle
    "inv_freq": """
inv_freq = k_dst.view(-1)[:4]""",
}


@pytest.mark.parametrize("name", list(_ALIAS_CASES))
def test_inputs_sharing_memory_with_an_output_are_refused(name):
    code = f"""
import torch, semshare_ops as ss
torch.manual_seed(0)
k_dst, v_dst = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
k_src, v_src = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
src_idx, dst_idx, delta = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([3, 3, 3, 3])
inv_freq = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float32) / 4)
{_ALIAS_CASES[name]}
before = (k_dst.clone(), v_dst.clone())
try:
    ss.rope_reuse_(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq)
except RuntimeError as err:
    assert "{name}" in str(err) and "share memory" in str(err), str(err)
    assert torch.equal(k_dst, before[0]) and torch.equal(v_dst, before[1]), "written before refusing"
    print("refused")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("name", list(_ALIAS_CASES))
def test_inputs_sharing_memory_with_an_output_are_refused_when_traced(name):
    """The fake kernel sees the aliasing too (fake tensors keep it) and refuses by name where eager does."""
    torch.manual_seed(0)
    k_dst, v_dst = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    k_src, v_src = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    src_idx, dst_idx, delta = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([3, 3, 3, 3])
    inv_freq = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float32) / 4)
    args = dict(k_dst=k_dst, v_dst=v_dst, k_src=k_src, v_src=v_src, src_idx=src_idx, dst_idx=dst_idx, delta=delta,
                inv_freq=inv_freq)
    exec(_ALIAS_CASES[name], {"torch": torch}, args)
    err = expect_arg_error(lambda: fake_call(lambda *t: call(impl_module("ops"), dict(zip(args, t)), True),
                                             *args.values()), name)
    assert "share memory" in str(err), str(err)


def test_overlapping_outputs_are_refused_under_compile():
    """torch.compile(backend="aot_eager") functionalises the in-place op: k_dst becomes a copy, so without the fake
    kernel's overlap check a k_src that overlaps k_dst was served (reading the old rows) where eager refuses. Now
    refused at trace time, naming both, and nothing is written."""
    a = make_case("cpu", t_dst=12, t_src=9, pairs=6, seed=36)
    _overlap_k(a)
    before = a["k_dst"].clone(), a["k_src"].clone()
    ops = impl_module("ops")
    compiled = torch.compile(lambda *t: call(ops, dict(zip(a, t)), True), backend="aot_eager", fullgraph=True)
    err = expect_arg_error(lambda: compiled(*a.values()), "k_dst")
    assert "must not share memory with k_src" in str(err), str(err)
    assert_bits_equal(a["k_dst"], before[0], "k_dst after a rejected call")
    assert_bits_equal(a["k_src"], before[1], "k_src after a rejected call")


@pytest.mark.parametrize("impl_name", ["ops", "cuda_emulated"])
@pytest.mark.parametrize("pair", ["k_dst-k_src", "v_dst-v_src", "k_dst-v_dst"])
def test_outputs_sharing_memory_through_another_storage_are_refused(impl_name, pair):
    """An output and a source (or the other output) over one buffer through two Storages (torch.from_numpy twice;
    DLPack, frombuffer alike): the kernels compare addresses, not Storage identity, and refuse the call by name
    before any write. The Storage test once let it through, and the one-pass kernel read rows it had overwritten."""
    np = pytest.importorskip("numpy")
    a = make_case("cpu", t_dst=12, t_src=9, heads=3, dim=32, v_dim=32, pairs=6, seed=34)
    out_name, in_name = pair.split("-")
    rows = a[out_name].shape[0]
    buf = randn((rows + 2,) + tuple(a[out_name].shape[1:]), gen=make_generator(35)).numpy()
    a[out_name] = torch.from_numpy(buf)[:rows]
    a[in_name] = torch.from_numpy(buf)[2 : 2 + a[in_name].shape[0]]  # overlaps rows 2.. of the output
    assert a[out_name].untyped_storage().data_ptr() == a[in_name].untyped_storage().data_ptr()  # one buffer
    before = buf.copy()
    err = expect_arg_error(lambda: call(impl_module(impl_name), a, True), out_name)
    assert in_name in str(err) and "share memory" in str(err), str(err)
    assert np.array_equal(buf, before), "written before refusing"


@pytest.mark.parametrize("which", ["k_dst", "v_src", "dst_idx"])
def test_meta_tensor_mixed_with_cpu_tensors_is_refused(which):
    """A meta tensor routes the call to the fake kernel, which must refuse the mix rather than do nothing."""
    args = dict(k_dst=torch.randn(8, 2, 4), v_dst=torch.randn(8, 2, 4), k_src=torch.randn(8, 2, 4),
                v_src=torch.randn(8, 2, 4), src_idx=torch.tensor([1]), dst_idx=torch.tensor([2]),
                delta=torch.tensor([1]), inv_freq=torch.ones(2))
    args[which] = args[which].to("meta")
    expect_arg_error(lambda: impl_module("ops").rope_reuse_(**args), which if which != "k_dst" else "v_dst")


def test_autograd_sees_the_in_place_write(device):
    """No derivative, and autograd is told so: under grad mode a tensor of the call that requires grad is refused
    by name, and the write bumps both outputs' version counters, so a graph that saved one of them fails at
    backward instead of differentiating through the new values (as with torch's own in-place ops)."""
    a = make_case(device, t_dst=12, t_src=9, pairs=4, seed=30)
    w = a["k_dst"].clone().requires_grad_()
    for name in ("k_dst", "v_src", "inv_freq"):  # inv_freq: fp32, a Parameter of a learned RoPE could reach it
        b = dict(a, **{name: a[name].clone().requires_grad_()})
        before = b["k_dst"].detach().clone()
        with pytest.raises(RuntimeError, match=f"{name} requires grad"):
            call(impl_module("ops"), b)
        assert torch.equal(b["k_dst"].detach(), before)
    kd = w * 1.0
    y = (kd * kd).sum()
    with torch.no_grad():
        v0, vv0 = kd._version, a["v_dst"]._version
        call(impl_module("ops"), dict(a, k_dst=kd))
        assert kd._version > v0 and a["v_dst"]._version > vv0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
