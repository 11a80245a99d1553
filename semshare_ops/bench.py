"""Microbenchmarks of the ops at model shapes, against baselines measured in the same process.

Every record reports the median time in microseconds, the achieved rate (GB/s for the memory-bound ops,
TFLOP/s for partial_attn, counted on the work the sparse queries really need) and the speedup over each
baseline: the pure-torch reference (`semshare_ops.reference`) and, for partial_attn, torch SDPA with an
explicit boolean mask. Used by `bench/bench_ops.py` and `semshare bench ops`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import ops
from . import reference as ref


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int


SHAPES = {
    "smollm2-135m": ModelShape("smollm2-135m", 30, 9, 3, 64, 576),
    "llama3-8b": ModelShape("llama3-8b", 32, 32, 8, 128, 4096),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 28, 4, 128, 3584),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_us(fn: Callable[[], object], device: str, warmup: int = 2, repeat: int = 7,
              budget_s: float = 20.0) -> float:
    """Median wall time of fn() in microseconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return statistics.median(times) * 1e6


def _record(op: str, shape: ModelShape, tokens: int, params: Dict, us: float, rate: float, unit: str,
            baselines: Dict[str, float], device: str) -> Dict:
    return {
        "op": op, "model": shape.name, "tokens": tokens, **params, "device": device, "us": round(us, 1),
        unit: round(rate, 3), "baselines_us": {k: round(v, 1) for k, v in baselines.items()},
        "speedup": {k: round(v / us, 2) for k, v in baselines.items()},
    }


def bench_simhash(shape: ModelShape, tokens: int, device: str, bits: int = 128) -> Dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, shape.hidden, generator=gen).to(device, torch.bfloat16)
    planes = torch.randn(shape.hidden, bits, generator=gen).to(device)
    us = median_us(lambda: ops.simhash(x, planes), device)
    base = median_us(lambda: ref.simhash(x, planes), device)
    moved = x.numel() * x.element_size() + planes.numel() * 4 + tokens * math.ceil(bits / 64) * 8
    return _record("simhash", shape, tokens, {"bits": bits, "dtype": "bfloat16"}, us, moved / us / 1e3, "GB/s",
                   {"reference": base}, device)


def bench_hamming_topk(shape: ModelShape, tokens: int, device: str, bits: int = 128, k: int = 1) -> Dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    words = math.ceil(bits / 64)
    qc = torch.randint(-2**62, 2**62, (tokens, words), generator=gen).to(device)
    kc = torch.randint(-2**62, 2**62, (tokens, words), generator=gen).to(device)
    us = median_us(lambda: ops.hamming_topk(qc, kc, k), device)
    base = median_us(lambda: ref.hamming_topk(qc, kc, k), device, warmup=1, repeat=3)
    pairs_per_s = tokens * tokens / us * 1e6
    return _record("hamming_topk", shape, tokens, {"bits": bits, "k": k}, us, pairs_per_s / 1e9,
                   "Gpairs/s", {"reference": base}, device)


def bench_rope_reuse(shape: ModelShape, tokens: int, device: str, reuse: float = 0.9,
                     dtype: torch.dtype = torch.bfloat16) -> Dict:
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
    args = (k_dst, v_dst, k_src, v_src, src, dst, delta, inv_freq, True)
    us = median_us(lambda: ops.rope_reuse_(*args), device)
    base = median_us(lambda: ref.rope_reuse_(*args), device)
    moved = 2 * 2 * shape.layers * pairs * shape.kv_heads * shape.head_dim * k_src.element_size()  # K,V read+write
    return _record("rope_reuse_", shape, tokens, {"reuse": reuse, "dtype": str(dtype).replace("torch.", "")},
                   us, moved / us / 1e3, "GB/s", {"reference": base}, device)


def _sdpa_masked(q, k, v, q_pos):
    """Baseline: SDPA over all keys with an explicit boolean mask of the visible ones (GQA by expansion)."""
    group = q.shape[1] // k.shape[1]
    mask = ref.visible_mask(q_pos, torch.arange(k.shape[0], device=q.device))
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)


def bench_partial_attn(shape: ModelShape, tokens: int, device: str, ratio: float = 0.2,
                       dtype: torch.dtype = torch.bfloat16) -> Dict:
    """One layer: `ratio` of the tokens (random positions, plus the last) recomputed against the full cache."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    nq = max(1, int(tokens * ratio))
    q_pos = torch.randperm(tokens - 1, generator=gen)[: nq - 1].sort().values
    q_pos = torch.cat([q_pos, torch.tensor([tokens - 1])]).to(device)
    q = torch.randn(nq, shape.q_heads, shape.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(tokens, shape.kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    us = median_us(lambda: ops.partial_attn(q, k, v, q_pos), device)
    base = {"reference": median_us(lambda: ref.partial_attn(q, k, v, q_pos), device, warmup=1, repeat=3),
            "sdpa_masked": median_us(lambda: _sdpa_masked(q, k, v, q_pos), device, warmup=1, repeat=3)}
    visible = float((q_pos + 1).sum())  # keys each query really attends to
    flops = 4.0 * visible * shape.q_heads * shape.head_dim  # QK^T and PV, 2 FLOPs per multiply-add each
    return _record("partial_attn", shape, tokens, {"ratio": ratio, "queries": nq,
                                                   "dtype": str(dtype).replace("torch.", "")},
                   us, flops / us / 1e6, "TFLOP/s", base, device)


def run_ops(device: str = "cpu", models: Optional[List[str]] = None, lengths: Optional[List[int]] = None,
            ratios: Optional[List[float]] = None, progress: Callable[[Dict], None] = lambda r: None) -> List[Dict]:
    models = models or ["smollm2-135m", "llama3-8b"]
    lengths = lengths or [1024, 4096]
    ratios = ratios or [0.1, 0.2, 1.0]
    records = []
    for name in models:
        shape = SHAPES[name]
        for tokens in lengths:
            runs = [lambda: bench_simhash(shape, tokens, device),
                    lambda: bench_hamming_topk(shape, tokens, device),
                    lambda: bench_rope_reuse(shape, tokens, device)]
            runs += [lambda r=r: bench_partial_attn(shape, tokens, device, ratio=r) for r in ratios]
            for run in runs:
                record = run()
                progress(record)
                records.append(record)
    return records


def format_table(records: List[Dict]) -> str:
    lines = [f"{'op':<13} {'model':<13} {'tokens':>6} {'params':<28} {'us':>11} {'rate':>16}  speedup"]
    for r in records:
        params = ", ".join(f"{k}={r[k]}" for k in ("bits", "k", "reuse", "ratio", "dtype") if k in r)
        unit = next(u for u in ("TFLOP/s", "GB/s", "Gpairs/s") if u in r)
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items())
        lines.append(f"{r['op']:<13} {r['model']:<13} {r['tokens']:>6} {params:<28} {r['us']:>11.1f} "
                     f"{r[unit]:>8.3f} {unit:<8} {speed}")
    return "\n".join(lines)
