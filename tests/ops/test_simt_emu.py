"""The SIMT emulator (tests/simt_emu) that runs csrc/cuda/*.cu on the CPU: its own checks must fire.

The op tests run the CUDA kernels under it as the `cuda_emulated` implementation; these tests show that what it
claims to catch (missing barriers, divergent warp collectives, deadlocks, misaligned accesses, shared memory read
before written, cp.async data read before its wait, launch limits, out-of-bounds accesses under ASan) is caught, and that its mma.m16n8k16 computes
A B from fragments laid out as the PTX ISA's tables say.
"""

import os
import subprocess
import sys

import pytest
import torch

import simt_emu
from op_testutils import make_generator, randn

ORDERS = ["forward", "reverse", "shuffle", "warps-ahead"]


@pytest.fixture(scope="module")
def selftest():
    simt_emu.load()
    return torch.ops.simt_selftest


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("SIMT_EMU_ORDER", request.param)
    return request.param


def test_barrier_orders_shared_memory(selftest, order):
    expected = (torch.arange(64) + 1) % 64 + 1.0
    assert torch.equal(selftest.run("neighbour", 64), expected)


def test_missing_barrier_shows(selftest, monkeypatch):
    """Without the barrier, some resume order reads a neighbour's slot before it is written."""
    expected = (torch.arange(64) + 1) % 64 + 1.0
    wrong = []
    for order in ORDERS:
        monkeypatch.setenv("SIMT_EMU_ORDER", order)
        wrong.append(not torch.equal(selftest.run("neighbour_no_barrier", 64), expected))
    assert any(wrong)


def test_cp_async_lands_at_the_wait(selftest, order, monkeypatch):
    expected = 8.0 * ((torch.arange(64) + 1) % 8)
    assert torch.equal(selftest.run("cp_async", 64), expected)
    monkeypatch.setenv("SIMT_EMU_CP_ASYNC", "eager")
    assert torch.equal(selftest.run("cp_async_no_wait", 64), expected)  # landed at issue: the race is hidden
    monkeypatch.setenv("SIMT_EMU_CP_ASYNC", "deferred")
    out = selftest.run("cp_async_no_wait", 64)
    assert (out == 0xFFFF).any() and not torch.equal(out, expected)  # not landed yet: shared memory's 0xff bytes


@pytest.mark.parametrize("kernel, message", [
    ("divergent_shuffle", "lanes of a warp diverged"),
    ("deadlock", "deadlock"),
    ("misaligned_uint4", "misaligned access"),
    ("misaligned_load16", "not 16-byte aligned"),
])
def test_faults_fail_the_launch(selftest, order, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        selftest.run(kernel, 64)


def test_shared_memory_starts_as_nan(selftest):
    out = selftest.run("uninitialized_shared", 64)
    assert torch.equal(out[:32], torch.ones(32))
    assert torch.isnan(out[32:]).all()


def test_launch_limits(selftest):
    assert torch.equal(selftest.run("dynamic_shared", 128, 512), torch.full((128,), 2.0))
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        selftest.run("dynamic_shared", 128, 64 * 1024)  # over 48 KiB without cudaFuncSetAttribute
    with pytest.raises(RuntimeError, match="at most 1024 threads"):
        selftest.run("neighbour", 2048)
    # Without the opt-in, static and dynamic shared memory share the 48 KiB (40 KiB static here).
    assert torch.equal(selftest.run("static_and_dynamic", 64, 4 * 1024), torch.full((64,), 3.0))
    with pytest.raises(RuntimeError, match=r"static \+ dynamic shared memory over 48 KiB"):
        selftest.run("static_and_dynamic", 64, 16 * 1024)
    # __launch_bounds__(64): more threads per block fail the launch, as on a GPU.
    assert torch.equal(selftest.run("bounded", 64), torch.ones(64))
    with pytest.raises(RuntimeError, match=r"128 threads per block, over the kernel's __launch_bounds__\(64\)"):
        selftest.run("bounded", 128)


def test_grid_x_limit(selftest, monkeypatch):
    """A launch over the device's grid.x limit fails, as on a GPU; SIMT_EMU_MAX_GRID_X lowers the limit so that the
    ops' launches in chunks (csrc/cuda/launch.cuh) run on small inputs."""
    assert torch.equal(selftest.run("blocks", 5), torch.arange(1.0, 6.0))
    monkeypatch.setenv("SIMT_EMU_MAX_GRID_X", "4")
    with pytest.raises(RuntimeError, match=r"launch with grid \(5,1,1\), over the device's \(4,"):
        selftest.run("blocks", 5)
    assert torch.equal(selftest.run("blocks", 4), torch.arange(1.0, 5.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_from_ptx_fragment_tables(selftest, order, dtype):
    gen = make_generator(7)
    a, b = randn((16, 16), gen=gen, dtype=dtype), randn((16, 8), gen=gen, dtype=dtype)
    expected = a.double() @ b.double()
    torch.testing.assert_close(selftest.mma(a, b).double(), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(os.environ.get("SIMT_EMU_ASAN") != "1", reason="only in the AddressSanitizer run (make cuda-emulate)")
def test_asan_catches_out_of_bounds():
    code = "import simt_emu, torch; simt_emu.load(); torch.ops.simt_selftest.run('out_of_bounds', 32)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]
