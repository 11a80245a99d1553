// Host-side launch limits shared by the CUDA ops.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace semshare {

// The most blocks one launch may have along grid.x on `device`: 2^31 - 1 on every GPU since sm_30. dim3 holds
// unsigned ints, so a larger count would wrap to a small grid that silently skips work; the ops launch in chunks of
// at most this many blocks instead (or refuse by name where a chunk cannot be expressed). Read per call (a cached
// attribute) so that the SIMT emulator's SIMT_EMU_MAX_GRID_X can lower it and the chunking is tested on small inputs.
inline int64_t max_grid_x(int device) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&blocks, cudaDevAttrMaxGridDimX, device));
  return blocks;
}

}  // namespace semshare
