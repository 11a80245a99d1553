// SIMT emulator stand-in (python_tests/simt_emu): the fp16 pair the kernels pack, rounded to nearest even.
#pragma once
#include "simt_emu.h"
struct alignas(4) __half2 {
  uint16_t lo, hi;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return {c10::Half(lo).x, c10::Half(hi).x}; }
