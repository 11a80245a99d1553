// SIMT emulator stand-in (python_tests/simt_emu): one device, the CPU.
#pragma once
#include "simt_emu.h"
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
