// SIMT emulator stand-in (python_tests/simt_emu): launch errors are thrown by the emulator at the launch itself.
#pragma once
#include "simt_emu.h"
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
