"""csrc/cuda/*.cu run on the CPU by a SIMT emulator, so that sessions without a GPU test the CUDA kernels as written.

`load()` copies the CUDA sources into build/simt_emu with three mechanical rewrites, compiles them as C++ against
the stand-in headers in include/ (the CUDA runtime calls, the inline PTX of csrc/cuda/ptx.cuh, the fp16/bf16 pair
types, c10's CUDA guard and stream) and the fiber runtime include/simt_emu.h, and registers the kernels as the CPU
kernels of `torch.ops.semshare_emu.*`, the same schemas as `torch.ops.semshare.*`:

- ``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::simt::launch(kernel, grid, block, smem, stream)(args)``;
- ``__shared__`` declarations become per-block arrays (``extern __shared__``: the launch's dynamic shared memory);
- ``TORCH_LIBRARY_IMPL(semshare, CUDA, m)`` becomes ``TORCH_LIBRARY_IMPL(semshare_emu, CPU, m)``.

Every CUDA thread is a fiber, warps meet in real barriers, and misaligned accesses, unreached barriers, divergent
warp collectives and launch limits (block and grid sizes, shared memory with and without the opt-in,
``__launch_bounds__``, which a fourth rewrite moves into the kernel's body) fail the call with a RuntimeError (see
include/simt_emu.h). Shared memory starts as 0xff bytes (NaN in floats, -1 in integers), so a read before a write
shows in the results, not as an error: a max, a false comparison or a -1 meaning "empty" can hide it. Timing,
inter-block memory ordering and the exact fp32 rounding of the tensor cores are not modelled: the GPU run
(benchmarks/gpu_session.sh) stays the real check.
"""
from __future__ import annotations

import functools
import os
import re

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
NAME = "semshare_simt_emu"

_SHARED_ARRAY = re.compile(r"__shared__ (?:__align__\((\d+)\) )?([\w:]+) (\w+)\[([^\]]+)\];")
_SHARED_SCALAR = re.compile(r"__shared__ ([\w:]+) (\w+);")
# __global__ void __launch_bounds__(bound) name(params) {  ->  ... name(params) { ::simt::launch_bounds(bound);
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(([^()]*(?:\([^()]*\)[^()]*)*)\)(\s+\w+\s*\([^{;]*\)\s*)\{")
_EXTERN_SHARED = re.compile(r"extern __shared__ ([\w:]+(?: [\w:]+)*) (\w+)\[\];")
_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)  # kernel or kernel<T, N>


def rewrite(source: str) -> str:
    """A CUDA source as C++ for the emulator (the three rewrites of the module docstring)."""
    s = _EXTERN_SHARED.sub(r"\1* \2 = ::simt::dynamic_shared<\1>();", source)
    s = _SHARED_ARRAY.sub(
        lambda m: f"{m[2]}* {m[3]} = ::simt::shared_array<{m[2]}>({m[4]}, {m[1] or f'alignof({m[2]})'});", s)
    s = _SHARED_SCALAR.sub(r"\1& \2 = *::simt::shared_array<\1>(1, alignof(\1));", s)
    s = _LAUNCH.sub(r"::simt::launch(\1, \2)(", s)
    s = _LAUNCH_BOUNDS.sub(r"\2{ ::simt::launch_bounds(\1);", s)
    s = s.replace("TORCH_LIBRARY_IMPL(semshare, CUDA, m)", "TORCH_LIBRARY_IMPL(semshare_emu, CPU, m)")
    leftover = [w for w in ("__shared__", "<<<", "TORCH_LIBRARY_IMPL(semshare,", "__launch_bounds__") if w in s]
    if leftover:
        raise RuntimeError(f"simt_emu: no rewrite for {leftover} (extend tests/simt_emu/__init__.py)")
    return s


def _write_if_changed(path: str, text: str) -> None:
    """Unchanged sources keep their mtime, so ninja rebuilds only what changed."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@functools.lru_cache(maxsize=None)
def load():
    """Builds (once; ninja keeps it up to date in build/simt_emu) and loads the emulated CUDA kernels; returns
    torch.ops.semshare_emu (and torch.ops.simt_selftest, the emulator's own test kernels)."""
    from torch.utils import cpp_extension

    asan = os.environ.get("SIMT_EMU_ASAN") == "1"
    build = os.path.join(ROOT, "build", "simt_emu_asan" if asan else "simt_emu")
    src = os.path.join(build, "src")
    for header in sorted(n for n in os.listdir(os.path.join(ROOT, "csrc")) if n.endswith(".h")):
        with open(os.path.join(ROOT, "csrc", header)) as f:
            _write_if_changed(os.path.join(src, header), f.read())
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        ops = f.read().replace("TORCH_LIBRARY(semshare, m)", "TORCH_LIBRARY(semshare_emu, m)")
    _write_if_changed(os.path.join(src, "ops.cpp"), ops)
    sources = [os.path.join(src, "ops.cpp"), os.path.join(HERE, "runtime.cpp")]
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cu_files = [os.path.join(cuda_dir, n) for n in sorted(os.listdir(cuda_dir)) if n.endswith(".cu")]
    for header in sorted(n for n in os.listdir(cuda_dir) if n.endswith(".cuh") and n != "ptx.cuh"):
        with open(os.path.join(cuda_dir, header)) as f:  # ptx.cuh: include/ has the emulator's own
            _write_if_changed(os.path.join(src, "cuda", header), f.read())
    for cu in cu_files + [os.path.join(HERE, "selftest.cu")]:  # selftest.cu: tests/test_simt_emu.py
        with open(cu) as f:
            text = rewrite(f.read())
        path = os.path.join(src, "cuda", os.path.basename(cu)[:-3] + ".cpp")
        _write_if_changed(path, text)
        sources.append(path)
    # -O1: fast enough to run, quick to build. Alignment checks report through runtime.cpp (no libubsan).
    cflags = ["-O1", "-g0", "-fvisibility=hidden", "-fsanitize=alignment", "-Wno-unknown-pragmas"]
    if asan:  # out-of-bounds global and shared memory accesses; needs libasan preloaded (make cuda-emulate)
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    cpp_extension.load(
        name=NAME + ("_asan" if asan else ""),
        sources=sources,
        extra_include_paths=[os.path.join(HERE, "include")],
        extra_cflags=cflags,
        build_directory=build,
        is_python_module=False,
        verbose=os.environ.get("SIMT_EMU_VERBOSE") == "1",
    )
    return torch.ops.semshare_emu
