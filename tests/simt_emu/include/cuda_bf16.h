// SIMT emulator stand-in (python_tests/simt_emu): the bf16 pair the kernels pack, rounded to nearest even.
#pragma once
#include "simt_emu.h"
struct alignas(4) __nv_bfloat162 {
  uint16_t lo, hi;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {c10::BFloat16(lo).x, c10::BFloat16(hi).x};
}
