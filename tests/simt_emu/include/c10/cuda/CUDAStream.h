// SIMT emulator stand-in (python_tests/simt_emu): launches run synchronously; a stream is a tag.
#pragma once
#include "simt_emu.h"
namespace c10::cuda {
inline simt::Stream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
