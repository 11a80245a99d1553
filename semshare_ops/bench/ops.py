"""Microbenchmarks of the ops at model shapes, against baselines measured in the same process.

Every record reports the median time in microseconds, the achieved rate (GB/s for the memory-bound ops,
TFLOP/s for simhash's projection and partial_attn, counted on the work the sparse queries really need), the
rate as a percentage of a ceiling measured on the same device in the same process (`pct_of_ceiling`), and the
speedup over each baseline: the pure-torch oracle (`semshare_ops.ops.oracle`) and, for partial_attn, torch
SDPA with an explicit boolean mask and FlexAttention with a block mask (compiled). partial_attn records also
carry `pct_of_sdpa_causal`: their TFLOP/s over dense causal SDPA's at the same shape and length, the rate a
prefill kernel of the same device reaches when it skips nothing.

The input construction of every op (`*_inputs`) and its work count (`*_work`: FLOPs, bytes) are public so that
the pytest-benchmark suites in `benchmarks/` time exactly what these functions time.
Used by `semshare bench ops` and `benchmarks/suite_ops.py`.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..ops import oracle as ref
from .shapes import SHAPES, ModelShape, dtype_name
from .timing import median_us, paired_median_us


def _sig(x: float) -> float:
    """4 significant digits: percentages span 0.001% (hamming_topk's bytes) to ~100%."""
    return float(f"{x:.4g}")


# ---- measured ceilings -------------------------------------------------------------------------------------------

def copy_gbps(device: str, nbytes: Optional[int] = None) -> float:
    """GB/s of `dst.copy_(src)` on one large contiguous buffer, counting bytes read plus bytes written."""
    nbytes = nbytes or ((256 if device.startswith("cuda") else 64) << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device, warmup=2, repeat=9 if device.startswith("cuda") else 5)
    return 2 * nbytes / us / 1e3


def gemm_tflops(device: str, dtype: torch.dtype, max_n: Optional[int] = None,
                slow_s: float = 0.5) -> Tuple[float, int]:
    """(best TFLOP/s, its n) of square n x n GEMMs in `dtype`, n doubling from 256 to `max_n`.

    The ladder stops before a GEMM expected to take longer than `slow_s`: torch's bf16/fp16 GEMM on a CPU without
    bf16/fp16 matrix units is a scalar loop that needs about a minute at n = 2048, and its best rate is reached
    well before.
    """
    cuda = device.startswith("cuda")
    max_n = max_n or (8192 if cuda else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    best, best_n, n = 0.0, 0, 256
    while n <= max_n:
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        us = median_us(lambda: torch.mm(a, b), device, warmup=1, repeat=10 if cuda else 3, budget_s=5.0)
        rate = 2.0 * n ** 3 / us / 1e6
        if rate > best:
            best, best_n = rate, n
        if 8 * us > slow_s * 1e6:  # n doubled: 8x the work
            break
        n *= 2
    return best, best_n


def device_ceilings(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Dict:
    """Copy bandwidth and GEMM throughput of `device`, measured now (a few seconds on a CPU).

    `matmul_fp32_TFLOP/s` is the ceiling of simhash, whose projection is an fp32 GEMM whatever its input's dtype.
    `matmul_TFLOP/s`, the ceiling of partial_attn, is the faster of a GEMM in `dtype` and one in fp32:
    the kernels compute in fp32 (docs/contract.md section 3), so on a CPU whose bf16 GEMM is slower than its fp32 GEMM the
    hardware's real limit for bf16 inputs is the fp32 rate; on GPUs the bf16/fp16 tensor-core rate is the larger.
    """
    by_dtype, sizes = {}, {}
    for dt in dict.fromkeys([dtype, torch.float32]):
        rate, n = gemm_tflops(device, dt)
        by_dtype[dtype_name(dt)], sizes[dtype_name(dt)] = _sig(rate), n
    return {"device": device, "dtype": dtype_name(dtype), "copy_GB/s": _sig(copy_gbps(device)),
            "matmul_TFLOP/s": max(by_dtype.values()), "matmul_fp32_TFLOP/s": by_dtype["float32"],
            "matmul_TFLOP/s_by_dtype": by_dtype, "matmul_n": sizes}


def causal_attn_inputs(shape: ModelShape, tokens: int, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, Hq, N, D]: one layer of a dense causal prefill.

    K/V are expanded to the query heads here, outside any timed call: plain multi-head input runs on every SDPA
    backend (not all of them take `enable_gqa`), and the FLOPs are the same.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    group = shape.q_heads // shape.kv_heads
    q = torch.randn(1, shape.q_heads, tokens, shape.head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen).to(device, dtype)
            .repeat_interleave(group, dim=1) for _ in range(2))
    return q, k, v


def causal_attn_flops(shape: ModelShape, tokens: int) -> float:
    return 4.0 * shape.head_dim * shape.q_heads * tokens * (tokens + 1) / 2  # QK^T and PV over the visible keys


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_causal_tflops(shape: ModelShape, tokens: int, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu") -> float:
    """TFLOP/s of dense causal SDPA (`is_causal=True`) over one layer at this shape and length."""
    q, k, v = causal_attn_inputs(shape, tokens, dtype, device)
    us = median_us(lambda: sdpa_causal(q, k, v), device, warmup=1, repeat=3)
    return causal_attn_flops(shape, tokens) / us / 1e6


# ---- inputs and work of each op (shared with the pytest-benchmark suite) ----------------------------------------

def simhash_inputs(shape: ModelShape, tokens: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                   bits: int = 128) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, shape.hidden, generator=gen).to(device, dtype)
    planes = torch.randn(shape.hidden, bits, generator=gen).to(device)
    return x, planes


def simhash_work(x: torch.Tensor, planes: torch.Tensor) -> Dict[str, float]:
    tokens, bits = x.numel() // x.shape[-1], planes.shape[1]
    moved = x.numel() * x.element_size() + planes.numel() * 4 + tokens * math.ceil(bits / 64) * 8
    return {"flops": 2.0 * tokens * x.shape[-1] * bits, "bytes": float(moved)}


def hamming_topk_inputs(shape: ModelShape, tokens: int, device: str = "cpu", bits: int = 128,
                        k: int = 1) -> Tuple[torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    words = math.ceil(bits / 64)
    qc = torch.randint(-2**62, 2**62, (tokens, words), generator=gen).to(device)
    kc = torch.randint(-2**62, 2**62, (tokens, words), generator=gen).to(device)
    return qc, kc, k


def hamming_topk_work(qc: torch.Tensor, kc: torch.Tensor, k: int) -> Dict[str, float]:
    """Pairs compared, and the bytes that must move at least once (codes in, distances and indices out)."""
    moved = (qc.numel() + kc.numel()) * 8 + qc.shape[0] * k * (4 + 8)
    return {"pairs": float(qc.shape[0] * kc.shape[0]), "bytes": float(moved)}


def rope_reuse_inputs(shape: ModelShape, tokens: int, reuse: float = 0.9, dtype: torch.dtype = torch.bfloat16,
                      device: str = "cpu") -> Tuple:
    """All layers of a target cache assembled from a reference cache, `reuse` of the tokens moved and rotated."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    size = (shape.layers, tokens, shape.kv_heads, shape.head_dim)
    k_src = torch.randn(size, generator=gen).to(device, dtype)
    v_src = torch.randn(size, generator=gen).to(device, dtype)
    k_dst, v_dst = torch.empty_like(k_src).normal_(), torch.empty_like(v_src).normal_()
    pairs = int(tokens * reuse)
    src = torch.randperm(tokens, generator=gen)[:pairs].sort().values.to(device)
    dst = torch.randperm(tokens, generator=gen)[:pairs].sort().values.to(device)
    delta = dst - src
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim))).to(device)
    return k_dst, v_dst, k_src, v_src, src, dst, delta, inv_freq, True


def rope_reuse_work(k_dst, v_dst, k_src, v_src, src_idx, *rest) -> Dict[str, float]:
    layers = k_src.shape[0] if k_src.dim() == 4 else 1
    rows = layers * src_idx.shape[0] * k_src.shape[-2]
    moved = 2 * rows * (k_src.shape[-1] + v_src.shape[-1]) * k_src.element_size()  # K and V, read + write
    return {"bytes": float(moved)}


def partial_attn_inputs(shape: ModelShape, tokens: int, ratio: float = 0.2, dtype: torch.dtype = torch.bfloat16,
                        device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer: `ratio` of the tokens (random positions, plus the last) recomputed against the full cache."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    nq = max(1, int(tokens * ratio))
    q_pos = torch.randperm(tokens - 1, generator=gen)[: nq - 1].sort().values
    q_pos = torch.cat([q_pos, torch.tensor([tokens - 1])]).to(device)
    q = torch.randn(nq, shape.q_heads, shape.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    return q, k, v, q_pos


def partial_attn_work(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      window: int = -1) -> Dict[str, float]:
    seen = q_pos + 1 if window <= 0 else torch.clamp(q_pos + 1, max=window)
    visible = float(seen.sum())  # keys each query really attends to
    return {"flops": 2.0 * visible * q.shape[1] * (q.shape[2] + v.shape[2])}  # QK^T and PV, 2 FLOPs per FMA


# ---- baselines of partial_attn -----------------------------------------------------------------------------------

def _sdpa_masked(q, k, v, q_pos, window: int = -1) -> Callable[[], torch.Tensor]:
    """Baseline: a call of SDPA over all keys with an explicit boolean mask of the visible ones, GQA by expanding
    K/V (as HF's SDPA path does in every layer, so the expansion is timed). The mask is built here, outside the
    timed call, as FlexAttention's block mask is: an engine builds it once per batch and reuses it in every layer
    (it was built inside, 1-2% of the baseline's time)."""
    group = q.shape[1] // k.shape[1]
    mask = ref.visible_mask(q_pos, torch.arange(k.shape[0], device=q.device), window)
    qt = q.transpose(0, 1)

    def call() -> torch.Tensor:
        kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
        vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
        return torch.nn.functional.scaled_dot_product_attention(qt, kk, vv, attn_mask=mask)

    return call


_flex_compiled = None
_flex_absent: Dict[str, str] = {}  # device type -> why FlexAttention cannot run there at all
_flex_said: set = set()  # reasons already printed: each is said once on stderr, not once per record


def _flex_unavailable(device_type: str, reason: str, sticky: bool) -> None:
    if reason not in _flex_said:
        _flex_said.add(reason)
        print(f"semshare bench: FlexAttention baseline absent on {device_type}: {reason}", file=sys.stderr)
    if sticky:
        _flex_absent[device_type] = reason


def flex_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_pos: torch.Tensor) -> Tuple[Optional[Callable[[], torch.Tensor]], Optional[str]]:
    """(fn, None) with fn() running compiled FlexAttention on what `partial_attn(q, k, v, q_pos)` computes, or
    (None, why) where FlexAttention cannot run or disagrees with partial_attn.

    The block mask is built here, outside the timed call: a serving engine builds it once per batch and reuses
    it in every layer. The first call compiles (seconds) and is checked against `ops.partial_attn`.
    """
    global _flex_compiled
    device_type = q.device.type
    if device_type in _flex_absent:
        return None, _flex_absent[device_type]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        _flex_unavailable(device_type, f"torch {torch.__version__} has no FlexAttention ({e})", sticky=True)
        return None, _flex_absent[device_type]
    qq, kk, vv = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))  # [1, H, N, D]

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= q_pos[q_idx]

    try:
        block_mask = create_block_mask(visible, None, None, q.shape[0], k.shape[0], device=q.device)
        if _flex_compiled is None:
            # dynamic=False: one kernel per shape, as a serving engine would specialise; fullgraph: a graph break
            # would silently time the unfused eager path.
            _flex_compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        fn = lambda: _flex_compiled(qq, kk, vv, block_mask=block_mask, enable_gqa=True)  # noqa: E731
        # Every (shape, length, ratio) is a new specialisation; past dynamo's default limit of 8 it would fall
        # back to eager. Timed calls reuse the compiled kernel, so the limit needs lifting only here.
        with torch._dynamo.config.patch(recompile_limit=10_000, accumulated_recompile_limit=10_000):
            out = fn()
    except torch.OutOfMemoryError as e:
        reason = f"out of memory at {q.shape[0]} queries x {k.shape[0]} keys ({str(e).splitlines()[0]})"
        _flex_unavailable(device_type, reason, sticky=False)
        return None, reason
    except Exception as e:  # noqa: BLE001 - any failure of an optional baseline is reported, never fatal
        _flex_unavailable(device_type, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}", sticky=True)
        return None, _flex_absent[device_type]
    expected = ops.partial_attn(q, k, v, q_pos)[0]
    err = (out[0].transpose(0, 1).float() - expected.float()).abs().max().item()
    tol = 1e-3 if q.dtype == torch.float32 else 5e-2
    if not err <= tol:
        reason = f"disagrees with partial_attn (max error {err:.3g} > {tol})"
        _flex_unavailable(device_type, reason, sticky=False)
        return None, reason
    return fn, None


# ---- one record per op and configuration -------------------------------------------------------------------------

def _record(op: str, shape: ModelShape, tokens: int, params: Dict, us: float, rate: float, unit: str,
            baselines: Dict[str, float], device: str) -> Dict:
    # The rate to 4 significant digits, as the percentages: 3 decimals kept 0.024 of 0.0245 TFLOP/s (2% off).
    return {
        "op": op, "model": shape.name, "tokens": tokens, **params, "device": device, "us": round(us, 1),
        unit: _sig(rate), "baselines_us": {k: round(v, 1) for k, v in baselines.items()},
        "speedup": {k: round(v / us, 2) for k, v in baselines.items()},
    }


def _against(record: Dict, ceilings: Dict, ceiling: str, rate: float) -> Dict:
    """`rate` (in the ceiling's unit) as a percentage of the measured ceiling."""
    record["ceiling"] = ceiling
    record["pct_of_ceiling"] = _sig(100.0 * rate / ceilings[ceiling])
    return record


def bench_simhash(shape: ModelShape, tokens: int, device: str, bits: int = 128,
                  dtype: torch.dtype = torch.bfloat16, ceilings: Optional[Dict] = None) -> Dict:
    ceilings = ceilings or device_ceilings(device, dtype)
    x, planes = simhash_inputs(shape, tokens, dtype, device, bits)
    us = median_us(lambda: ops.simhash(x, planes), device)
    base = median_us(lambda: ref.simhash(x, planes), device)
    work = simhash_work(x, planes)
    record = _record("simhash", shape, tokens, {"bits": bits, "dtype": dtype_name(dtype)}, us,
                     work["bytes"] / us / 1e3, "GB/s", {"reference": base}, device)
    record["TFLOP/s"] = _sig(work["flops"] / us / 1e6)
    # An fp32 GEMM (the input is cast to fp32): against the fp32 rate, not a GPU's bf16 tensor cores (10x higher).
    return _against(record, ceilings, "matmul_fp32_TFLOP/s", work["flops"] / us / 1e6)


def bench_hamming_topk(shape: ModelShape, tokens: int, device: str, bits: int = 128, k: int = 1,
                       ceilings: Optional[Dict] = None) -> Dict:
    """pct_of_ceiling counts only the bytes that must move, so it stays far below 100%: the op is bound by its
    Nq x Nk popcounts, not by memory; Gpairs/s is its figure of merit."""
    ceilings = ceilings or device_ceilings(device)
    qc, kc, k = hamming_topk_inputs(shape, tokens, device, bits, k)
    us = median_us(lambda: ops.hamming_topk(qc, kc, k), device)
    base = median_us(lambda: ref.hamming_topk(qc, kc, k), device, warmup=1, repeat=3)
    work = hamming_topk_work(qc, kc, k)
    record = _record("hamming_topk", shape, tokens, {"bits": bits, "k": k}, us, work["pairs"] / us / 1e3,
                     "Gpairs/s", {"reference": base}, device)
    record["GB/s"] = _sig(work["bytes"] / us / 1e3)
    return _against(record, ceilings, "copy_GB/s", work["bytes"] / us / 1e3)


def bench_rope_reuse(shape: ModelShape, tokens: int, device: str, reuse: float = 0.9,
                     dtype: torch.dtype = torch.bfloat16, ceilings: Optional[Dict] = None) -> Dict:
    """All layers of a target cache assembled from a reference cache, `reuse` of the tokens moved and rotated."""
    ceilings = ceilings or device_ceilings(device, dtype)
    args = rope_reuse_inputs(shape, tokens, reuse, dtype, device)
    us = median_us(lambda: ops.rope_reuse_(*args), device)
    base = median_us(lambda: ref.rope_reuse_(*args), device)
    gbps = rope_reuse_work(*args)["bytes"] / us / 1e3
    record = _record("rope_reuse_", shape, tokens, {"reuse": reuse, "dtype": dtype_name(dtype)}, us, gbps, "GB/s",
                     {"reference": base}, device)
    return _against(record, ceilings, "copy_GB/s", gbps)


REFERENCE_MAX_SCORES_GIB = 8.0


def bench_partial_attn(shape: ModelShape, tokens: int, device: str, ratio: float = 0.2,
                       dtype: torch.dtype = torch.bfloat16, ceilings: Optional[Dict] = None,
                       sdpa_causal_rate: Optional[float] = None, flex: bool = True, window: int = -1) -> Dict:
    """One layer: `ratio` of the tokens (random positions, plus the last) recomputed against the full cache, with
    a sliding window of `window` positions when > 0 (FLOPs then count the keys inside each query's window).

    `sdpa_causal_rate` (TFLOP/s of dense causal SDPA at this shape, length and dtype) is measured when not given.
    """
    ceilings = ceilings or device_ceilings(device, dtype)
    q, k, v, q_pos = partial_attn_inputs(shape, tokens, ratio, dtype, device)
    us = median_us(lambda: ops.partial_attn(q, k, v, q_pos, window=window), device)
    base, absent = {}, {}
    baselines: Dict[str, Callable[[], Callable[[], object]]] = {}  # name -> maker of its timed call
    # The reference holds [Hq, Nq, Nk] fp32 scores (and copies of them): 34 GB at 16k tokens of Llama-3-8B.
    scores_gib = 4.0 * q.shape[1] * q.shape[0] * k.shape[0] / 2**30
    if scores_gib > REFERENCE_MAX_SCORES_GIB:
        absent["reference"] = f"skipped: its fp32 scores would take {scores_gib:.1f} GiB"
    else:
        baselines["reference"] = lambda: (lambda: ref.partial_attn(q, k, v, q_pos, window=window))
    baselines["sdpa_masked"] = lambda: _sdpa_masked(q, k, v, q_pos, window)
    for name, make in baselines.items():  # each makes its timed call (what it builds once is not timed)
        try:
            base[name] = median_us(make(), device, warmup=1, repeat=3)
        except torch.OutOfMemoryError as e:  # a baseline that does not fit is reported, never fatal
            absent[name] = f"out of memory ({str(e).splitlines()[0][:120]})"
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    flex_fn, why = (flex_attention_fn(q, k, v, q_pos) if flex and window <= 0 else
                    (None, "not run (flex=False)" if not flex else "not run for windowed calls"))
    if flex_fn is not None:
        base["flex_attention"] = median_us(flex_fn, device, warmup=1, repeat=3)
    else:
        absent["flex_attention"] = why
    tflops = partial_attn_work(q, k, v, q_pos, window)["flops"] / us / 1e6
    params = {"ratio": ratio, "queries": q.shape[0], "dtype": dtype_name(dtype)}
    if window > 0:
        params["window"] = window
    record = _record("partial_attn", shape, tokens, params, us, tflops, "TFLOP/s", base, device)
    record["baselines_absent"] = absent
    if sdpa_causal_rate is None:
        sdpa_causal_rate = sdpa_causal_tflops(shape, tokens, dtype, device)
    record["sdpa_causal_TFLOP/s"] = _sig(sdpa_causal_rate)
    record["pct_of_sdpa_causal"] = _sig(100.0 * tflops / sdpa_causal_rate)
    return _against(record, ceilings, "matmul_TFLOP/s", tflops)


OPS = ("simhash", "hamming_topk", "rope_reuse_", "partial_attn")  # what run_ops times, in its order


def run_ops(device: str = "cpu", models: Optional[List[str]] = None, lengths: Optional[List[int]] = None,
            ratios: Optional[List[float]] = None, progress: Callable[[Dict], None] = lambda r: None,
            dtype: torch.dtype = torch.bfloat16, ceilings: Optional[Dict] = None, flex: bool = True,
            windows: Sequence[int] = (), ops_to_time: Sequence[str] = OPS) -> List[Dict]:
    """Records of each of `ops_to_time` (default: all, in `OPS` order) at every model shape and length (lengths of
    8192 and 16384 are for GPUs).

    `ceilings` (from `device_ceilings(device, dtype)`) are measured once here when not given; pass them to keep
    the numbers every record's percentage was computed against. Each of `windows` adds, after each partial_attn
    record, the same call with that sliding window, with its time as a fraction of the unwindowed call's
    (`us_vs_unwindowed`, from the two calls timed in turn).
    """
    models = models or ["smollm2-135m", "llama3-8b"]
    lengths = lengths or [1024, 4096]
    ratios = ratios or [0.1, 0.2, 1.0]
    ceilings = ceilings or device_ceilings(device, dtype)
    records = []
    for name in models:
        shape = SHAPES[name]
        for tokens in lengths:
            runs = []
            if "simhash" in ops_to_time:
                runs.append(lambda: bench_simhash(shape, tokens, device, dtype=dtype, ceilings=ceilings))
            if "hamming_topk" in ops_to_time:
                runs.append(lambda: bench_hamming_topk(shape, tokens, device, ceilings=ceilings))
            if "rope_reuse_" in ops_to_time:
                runs.append(lambda: bench_rope_reuse(shape, tokens, device, dtype=dtype, ceilings=ceilings))
            if "partial_attn" in ops_to_time:
                # dense causal SDPA at this shape and length: measured once for all ratios
                causal = sdpa_causal_tflops(shape, tokens, dtype, device)
                runs += [lambda r=r: bench_partial_attn(shape, tokens, device, ratio=r, dtype=dtype,
                                                        ceilings=ceilings, sdpa_causal_rate=causal, flex=flex)
                         for r in ratios]
            for run in runs:
                record = run()
                progress(record)
                records.append(record)
                if record["op"] != "partial_attn":
                    continue
                for w in windows:
                    windowed = bench_partial_attn(shape, tokens, device, ratio=record["ratio"], dtype=dtype,
                                                  ceilings=ceilings, sdpa_causal_rate=causal, flex=flex, window=w)
                    q, k, v, q_pos = partial_attn_inputs(shape, tokens, record["ratio"], dtype, device)
                    full_us, windowed_us = paired_median_us(
                        [lambda: ops.partial_attn(q, k, v, q_pos), lambda: ops.partial_attn(q, k, v, q_pos, window=w)],
                        device)
                    windowed["us_vs_unwindowed"] = _sig(windowed_us / full_us)  # timed in turn: drift cancels
                    progress(windowed)
                    records.append(windowed)
    return records


def format_ceilings(ceilings: Dict) -> str:
    by = ", ".join(f"{k} {v:g}" for k, v in ceilings["matmul_TFLOP/s_by_dtype"].items())
    return (f"ceilings on {ceilings['device']}: copy {ceilings['copy_GB/s']:g} GB/s (read + write), "
            f"GEMM {ceilings['matmul_TFLOP/s']:g} TFLOP/s ({by})")


def format_table(records: List[Dict]) -> str:
    lines = [f"{'op':<13} {'model':<13} {'tokens':>6} {'params':<28} {'us':>11} {'rate':>17} {'% ceil':>7}"
             f" {'% causal':>8}  speedup"]
    for r in records:
        params = ", ".join(f"{k}={r[k]}" for k in ("bits", "k", "reuse", "ratio", "window", "dtype") if k in r)
        unit = next(u for u in ("Gpairs/s", "TFLOP/s", "GB/s") if u in r)
        pct = f"{r['pct_of_ceiling']:>6.1f}%" if "pct_of_ceiling" in r else f"{'-':>7}"
        causal = f"{r['pct_of_sdpa_causal']:>7.0f}%" if "pct_of_sdpa_causal" in r else f"{'':>8}"
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items())
        if "us_vs_unwindowed" in r:
            speed += f"; {r['us_vs_unwindowed']:.2f} of the unwindowed time"
        lines.append(f"{r['op']:<13} {r['model']:<13} {r['tokens']:>6} {params:<28} {r['us']:>11.1f} "
                     f"{r[unit]:>9.4g} {unit:<7} {pct} {causal}  {speed}")
    return "\n".join(lines)
