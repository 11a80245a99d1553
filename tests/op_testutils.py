"""Helpers shared by the op tests (imported by test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA not available")),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# Implementations under test: the C++ ops (through the Python wrappers), the pure-torch reference, and the CUDA
# kernels' source run on the CPU by the SIMT emulator (tests/simt_emu; CPU tensors only). All must agree
# with the independent oracles written in the tests.
IMPLS = ["ops", "oracle", "cuda_emulated"]


class EmulatedCudaOps:
    """csrc/cuda/*.cu run on the CPU by tests/simt_emu, with the signatures of semshare_ops.ops."""

    def __init__(self):
        import simt_emu

        self.ops = simt_emu.load()

    def simhash(self, x, planes):
        return self.ops.simhash(x, planes)

    def hamming_topk(self, q_codes, k_codes, k):
        return self.ops.hamming_topk(q_codes, k_codes, k)

    def rope_reuse_(self, k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox=True):
        self.ops.rope_reuse_(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox)

    def partial_attn(self, q, k, v, q_pos, kv_pos=None, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, window=-1,
                     softcap=0.0, sinks=None):
        return self.ops.partial_attn(q, k, v, q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, scale, window, softcap, sinks)


@functools.lru_cache(maxsize=None)
def impl_module(name: str):
    import semshare_ops  # noqa: F401  (registers torch.ops.semshare.*)

    if name == "cuda_emulated":
        return EmulatedCudaOps()
    return importlib.import_module({"ops": "semshare_ops.ops", "oracle": "semshare_ops.ops.oracle"}[name])


# Absolute / relative tolerances for a result rounded once to `dtype` (values of order 1):
# fp32 results computed in fp32 agree to a few ulp (1e-5 leaves room for different summation orders);
# fp16 has a 2^-11 relative half-ulp (~5e-4) and bf16 2^-8 (~4e-3), so 2e-3 / 2e-2 allow one rounding step
# plus differently ordered fp32 arithmetic before it.
_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    atol, rtol = _TOL[dtype]
    return dict(atol=atol * scale, rtol=rtol * scale)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, *, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal data drawn on CPU in fp32 (device-independent), then cast and moved."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


def randint(low, high, shape, *, gen: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randint(low, high, tuple(shape), generator=gen, dtype=torch.int64).to(device)


def randperm(n, *, gen: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randperm(n, generator=gen, dtype=torch.int64).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a floating tensor (so -0.0 != +0.0 and NaN payloads compare)."""
    view = {
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float64: torch.int64,
    }[t.dtype]
    return t.contiguous().view(view)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = ""):
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    a, e = bits(actual.cpu()), bits(expected.cpu())
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{msg}: {bad.shape[0]} element(s) differ bitwise; first at {first}: "
            f"{actual.cpu()[first].item()!r} vs expected {expected.cpu()[first].item()!r}"
        )


def expect_arg_error(fn, *names: str):
    """`fn()` must raise RuntimeError or ValueError whose message names (one of) `names` as a whole word."""
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn()
    msg = str(info.value)
    pattern = "|".join(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" for n in names)
    assert re.search(pattern, msg), f"error message does not name {' or '.join(names)}: {msg!r}"
    return info.value


def fake_call(op, *args, dynamic: bool = False):
    """`op(*args)` as torch.compile and export trace it: every tensor becomes a fake tensor (its shape, strides, dtype
    and device, no data), so the op's fake kernel runs and no real one; `dynamic`: every size symbolic, as under
    `torch.compile(dynamic=True)`. Returns the fake outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv() if dynamic else None)

    def fake(t):
        if not isinstance(t, torch.Tensor):
            return t
        if not dynamic:
            return mode.from_tensor(t)
        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
        return mode.from_tensor(t, symbolic_context=context)

    fakes = [fake(a) for a in args]
    with mode:
        return op(*fakes)
