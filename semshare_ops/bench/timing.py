"""The timing loops every benchmark uses: median microseconds of a call, calls timed in turn, and statistics of
requests that report their own time to first token. Every CUDA call names the device timed: the current CUDA device
may be another one (cuda:0 while cuda:1 is timed)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_us(fn: Callable[[], object], device: str, warmup: int = 2, repeat: int = 7,
              budget_s: float = 20.0) -> float:
    """Median time of fn() in microseconds: wall time with the device synchronised around each call on CPUs,
    CUDA events around each call on GPUs (at least 15 calls there: single calls are short and noisy)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    if cuda:
        repeat = max(repeat, 15)
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)  # the stream fn's kernels on `device` run on
    times: List[float] = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        if cuda:
            start_ev.record(stream)
            fn()
            end_ev.record(stream)
            end_ev.synchronize()
            times.append(start_ev.elapsed_time(end_ev) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return statistics.median(times) * 1e6


def paired_median_us(fns: Sequence[Callable[[], object]], device: str, repeat: int = 9) -> List[float]:
    """Median times (us) of several calls timed in turn, round after round: a shared VM drifts by tens of percent
    within a minute, and interleaving makes a ratio of these medians immune to that drift."""
    for fn in fns:
        fn()
    rounds = [[median_us(fn, device, warmup=0, repeat=1) for fn in fns] for _ in range(repeat)]
    return [statistics.median(r[i] for r in rounds) for i in range(len(fns))]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile `q` (0-100) of `values`."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def interleaved_ttft_stats(requests: Dict[str, Callable[[], float]], repeat: int, device: str,
                           release: Optional[Callable[[], None]] = None, warmup: int = 1) -> Dict[str, Dict]:
    """Run each of `requests` (each returns its TTFT in ms) `repeat` times, round after round, each once per round in
    the given order, after `warmup` untimed rounds: per request, TTFT statistics in `vllm bench serve`'s names and
    the device's peak allocation during a request (CUDA only; None elsewhere).

    Rounds, not one request's runs after another's: a shared VM drifts by tens of percent within a minute, and a
    ratio between requests of the same rounds is immune to that drift. The warm-up round keeps a request's first
    run out of its statistics: it pays what later runs do not (new shapes' allocations and kernel selection).
    `release` drops what the caller keeps between requests for the next one's use (the engine's cache storage):
    called before each request's baseline on CUDA, so that memory counts in the request's peak instead of in the
    baseline (torch's caching allocator hands the same block back, so the request's time does not change)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        for request in requests.values():
            request()
    ttfts: Dict[str, List[float]] = {name: [] for name in requests}
    peaks: Dict[str, Optional[int]] = {name: None for name in requests}
    for _ in range(repeat):
        for name, request in requests.items():
            if cuda:
                if release is not None:
                    release()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            ttfts[name].append(request())
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated(device) - before
    return {name: {"mean_ttft_ms": statistics.fmean(t), "median_ttft_ms": statistics.median(t),
                   "p99_ttft_ms": percentile(t, 99), "std_ttft_ms": statistics.pstdev(t), "runs": len(t),
                   "peak_memory_bytes": peaks[name]} for name, t in ttfts.items()}
