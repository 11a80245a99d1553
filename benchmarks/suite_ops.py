"""pytest-benchmark suite of the ops, on the inputs `semshare bench ops` builds (semshare_ops.bench).

    pytest benchmarks/suite_ops.py --benchmark-only          # SmolLM2-135M shape, 1024 tokens, bfloat16, CPU
    SEMSHARE_BENCH_DEVICE=cuda SEMSHARE_BENCH_MODELS="llama3-8b qwen2.5-7b" \\
        SEMSHARE_BENCH_LENGTHS="1024 4096 16384" pytest benchmarks/suite_ops.py --benchmark-only

Environment: SEMSHARE_BENCH_DEVICE (default cuda when available), SEMSHARE_BENCH_MODELS (smollm2-135m),
SEMSHARE_BENCH_LENGTHS (1024), SEMSHARE_BENCH_RATIOS (partial_attn's recompute ratios: 0.2 1.0),
SEMSHARE_BENCH_DTYPE (bfloat16; float32 is the fast path of CPUs without AMX).

Each op and its baselines share a benchmark group, so the table compares them side by side. `extra_info` holds
the work of one call (`flops`, `bytes` or `pairs`): divide by the mean time for TFLOP/s, GB/s or pairs/s.
Ours runs under pytest-benchmark's own calibration; the baselines (pure-torch reference, masked SDPA,
FlexAttention, dense causal SDPA) take 3 rounds after one warm-up, as in `semshare bench ops`, since the
reference ones are slow by design.
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from semshare_ops import ops  # noqa: E402
from semshare_ops.bench import ops as bench  # noqa: E402
from semshare_ops.ops import oracle as ref  # noqa: E402

DEVICE = os.environ.get("SEMSHARE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
MODELS = os.environ.get("SEMSHARE_BENCH_MODELS", "smollm2-135m").split()
LENGTHS = [int(n) for n in os.environ.get("SEMSHARE_BENCH_LENGTHS", "1024").split()]
RATIOS = [float(r) for r in os.environ.get("SEMSHARE_BENCH_RATIOS", "0.2 1.0").split()]
DTYPE = getattr(torch, os.environ.get("SEMSHARE_BENCH_DTYPE", "bfloat16"))  # as the CLI's --dtype (cli.common)
HAMMING_REFERENCE_MAX = 2048  # the reference loops over 64 bit positions on [N, N] tensors: minutes past this

CASES = [pytest.param(bench.SHAPES[m], n, id=f"{m}-{n}") for m in MODELS for n in LENGTHS]


def _synced(fn):
    if DEVICE.startswith("cuda"):
        return lambda: (fn(), torch.cuda.synchronize())
    return fn


def _run(benchmark, impl, fn, group, work):
    benchmark.group = group
    benchmark.extra_info.update(work, device=DEVICE, dtype=bench.dtype_name(DTYPE))
    if impl == "semshare":
        benchmark(_synced(fn))
    else:
        benchmark.pedantic(_synced(fn), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["semshare", "reference"])
@pytest.mark.parametrize("shape, tokens", CASES)
def test_simhash(benchmark, shape, tokens, impl):
    x, planes = bench.simhash_inputs(shape, tokens, DTYPE, DEVICE)
    fn = {"semshare": ops.simhash, "reference": ref.simhash}[impl]
    _run(benchmark, impl, lambda: fn(x, planes), f"simhash {shape.name} {tokens}", bench.simhash_work(x, planes))


@pytest.mark.parametrize("impl", ["semshare", "reference"])
@pytest.mark.parametrize("shape, tokens", CASES)
def test_hamming_topk(benchmark, shape, tokens, impl):
    if impl == "reference" and tokens > HAMMING_REFERENCE_MAX:
        pytest.skip(f"the reference hamming_topk takes minutes past {HAMMING_REFERENCE_MAX} tokens")
    qc, kc, k = bench.hamming_topk_inputs(shape, tokens, DEVICE)
    fn = {"semshare": ops.hamming_topk, "reference": ref.hamming_topk}[impl]
    _run(benchmark, impl, lambda: fn(qc, kc, k), f"hamming_topk {shape.name} {tokens}",
         bench.hamming_topk_work(qc, kc, k))


@pytest.mark.parametrize("impl", ["semshare", "reference"])
@pytest.mark.parametrize("shape, tokens", CASES)
def test_rope_reuse(benchmark, shape, tokens, impl):
    args = bench.rope_reuse_inputs(shape, tokens, 0.9, DTYPE, DEVICE)
    fn = {"semshare": ops.rope_reuse_, "reference": ref.rope_reuse_}[impl]
    _run(benchmark, impl, lambda: fn(*args), f"rope_reuse_ {shape.name} {tokens}", bench.rope_reuse_work(*args))


@pytest.mark.parametrize("impl", ["semshare", "reference", "sdpa_masked", "flex_attention"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape, tokens", CASES)
def test_partial_attn(benchmark, shape, tokens, ratio, impl):
    q, k, v, q_pos = bench.partial_attn_inputs(shape, tokens, ratio, DTYPE, DEVICE)
    if impl == "flex_attention":
        fn, why = bench.flex_attention_fn(q, k, v, q_pos)  # compiles here, outside the timing
        if fn is None:
            pytest.skip(f"FlexAttention absent: {why}")
    else:
        fn = {"semshare": lambda: ops.partial_attn(q, k, v, q_pos),
              "reference": lambda: ref.partial_attn(q, k, v, q_pos),
              "sdpa_masked": lambda: bench._sdpa_masked(q, k, v, q_pos)}[impl]
    work = dict(bench.partial_attn_work(q, k, v, q_pos), queries=q.shape[0])
    _run(benchmark, impl, fn, f"partial_attn {shape.name} {tokens} ratio {ratio}", work)


@pytest.mark.parametrize("shape, tokens", CASES)
def test_sdpa_causal(benchmark, shape, tokens):
    """Dense causal prefill attention of one layer: the rate partial_attn's pct_of_sdpa_causal is read against."""
    q, k, v = bench.causal_attn_inputs(shape, tokens, DTYPE, DEVICE)
    _run(benchmark, "sdpa_causal", lambda: bench.sdpa_causal(q, k, v), f"sdpa_causal {shape.name} {tokens}",
         {"flops": bench.causal_attn_flops(shape, tokens)})
