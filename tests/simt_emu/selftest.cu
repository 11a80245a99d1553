// Kernels with the faults the SIMT emulator must catch, and one mma.m16n8k16 written straight from the PTX ISA's
// fragment tables, for python_tests/test_simt_emu.py. Built only into the emulator (never by nvcc).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "ptx.cuh"

namespace {

// Each thread writes its slot of shared memory and reads its neighbour's: right only with the barrier between.
__global__ void neighbour_kernel(bool barrier, float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x + 1.0f;
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// One warp per block; each block writes its own index + 1 (a grid of `n` blocks for the grid.x limit).
__global__ void blocks_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x + 1.0f;
}

// Half of each warp shuffles, the other half meets in __syncwarp: a collective the warp does not reach together.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = v;
}

// Thread 0 waits for its warp while the others wait for the block.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// 16-byte loads from an address 2 bytes past alignment: as a typed uint4 load, and as the PTX ld.global.v2.u64.
__global__ void misaligned_uint4_kernel(const uint16_t* p, float* out) {
  const uint4 x = *reinterpret_cast<const uint4*>(p + 1);
  out[threadIdx.x] = static_cast<float>(x.x);
}

__global__ void misaligned_load16_kernel(const uint16_t* p, float* out) {
  const ulonglong2 x = semshare::load16(p + 1);
  out[threadIdx.x] = static_cast<float>(x.x);
}

// Half of the shared array is never written: its reads see the emulator's 0xff bytes (NaN).
__global__ void uninitialized_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// 40 KiB static beside the launch's dynamic shared memory: over 48 KiB together without the opt-in.
__global__ void static_and_dynamic_kernel(float* out) {
  __shared__ float s[10240];
  extern __shared__ float d[];
  s[threadIdx.x] = 1.0f;
  d[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x] + d[threadIdx.x];
}

__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ float d[];
  d[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = d[(threadIdx.x + 1) % blockDim.x];
}

// Each thread copies 16 bytes global -> shared by cp.async and reads its neighbour's after a barrier: right only
// with the wait before the barrier.
__global__ void cp_async_kernel(bool wait, const uint16_t* p, float* out) {
  __shared__ __align__(16) uint16_t s[64 * 8];
  semshare::cp_async_16(s + 8 * threadIdx.x, p + 8 * (threadIdx.x % 8), true);
  semshare::cp_async_commit();
  if (wait) semshare::cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = s[8 * ((threadIdx.x + 1) % 64)];
}

// One past the end of `x`, for the AddressSanitizer build.
__global__ void out_of_bounds_kernel(const float* x, int64_t n, float* out) { out[threadIdx.x] = x[n]; }

// D = A B for A [16, 16] row-major and B [16, 8] (k, n) in fp16/bf16 bits, one warp. Fragments as the PTX ISA
// tables give them for mma.m16n8k16 with .f16/.bf16: groupID = lane >> 2, threadID_in_group = lane % 4;
// a_i: row groupID (+8 for i in {2, 3, 6, 7}), column 2 * threadID_in_group + (i & 1) (+8 for i >= 4);
// b_i: row 2 * threadID_in_group + (i & 1) (+8 for i >= 2), column groupID;
// c_i: row groupID (+8 for i >= 2), column 2 * threadID_in_group + (i & 1). Two 16-bit elements per register.
template <bool kBf16>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  const int lane = threadIdx.x, group = lane >> 2, tig = lane % 4;
  uint16_t ae[8], be[4];
  for (int i = 0; i < 8; ++i) {
    const int row = group + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
    const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
    ae[i] = a[row * 16 + col];
  }
  for (int i = 0; i < 4; ++i) be[i] = b[(2 * tig + (i & 1) + (i >= 2 ? 8 : 0)) * 8 + group];
  const uint32_t af[4] = {ae[0] | (uint32_t{ae[1]} << 16), ae[2] | (uint32_t{ae[3]} << 16),
                          ae[4] | (uint32_t{ae[5]} << 16), ae[6] | (uint32_t{ae[7]} << 16)};
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  semshare::mma_m16n8k16<kBf16>(c, af, be[0] | (uint32_t{be[1]} << 16), be[2] | (uint32_t{be[3]} << 16));
  for (int i = 0; i < 4; ++i) d[(group + (i >= 2 ? 8 : 0)) * 8 + 2 * tig + (i & 1)] = c[i];
}

at::Tensor run(const std::string& name, int64_t threads, int64_t dynamic_smem) {
  at::Tensor out = at::zeros({threads}, at::kFloat);
  at::Tensor words = at::arange(64, at::kShort);  // 16-byte aligned (torch's CPU allocator aligns to 64)
  const auto* p = reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>());
  float* o = out.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (name == "neighbour") neighbour_kernel<<<1, threads, 0, stream>>>(true, o);
  else if (name == "neighbour_no_barrier") neighbour_kernel<<<1, threads, 0, stream>>>(false, o);
  else if (name == "divergent_shuffle") divergent_shuffle_kernel<<<1, threads, 0, stream>>>(o);
  else if (name == "deadlock") deadlock_kernel<<<1, threads, 0, stream>>>(o);
  else if (name == "misaligned_uint4") misaligned_uint4_kernel<<<1, threads, 0, stream>>>(p, o);
  else if (name == "misaligned_load16") misaligned_load16_kernel<<<1, threads, 0, stream>>>(p, o);
  else if (name == "uninitialized_shared") uninitialized_shared_kernel<<<1, threads, 0, stream>>>(o);
  else if (name == "dynamic_shared") dynamic_shared_kernel<<<1, threads, dynamic_smem, stream>>>(o);
  else if (name == "static_and_dynamic") static_and_dynamic_kernel<<<1, threads, dynamic_smem, stream>>>(o);
  else if (name == "bounded") bounded_kernel<<<1, threads, 0, stream>>>(o);
  else if (name == "cp_async") cp_async_kernel<<<1, threads, 0, stream>>>(true, p, o);
  else if (name == "cp_async_no_wait") cp_async_kernel<<<1, threads, 0, stream>>>(false, p, o);
  else if (name == "blocks") blocks_kernel<<<threads, 32, 0, stream>>>(o);  // `threads` blocks here
  else if (name == "out_of_bounds") out_of_bounds_kernel<<<1, threads, 0, stream>>>(o, threads, o);
  else TORCH_CHECK(false, "no selftest kernel ", name);
  return out;
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
              a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous());
  at::Tensor d = at::empty({16, 8}, at::kFloat);
  const auto* ap = static_cast<const uint16_t*>(a.data_ptr());
  const auto* bp = static_cast<const uint16_t*>(b.data_ptr());
  if (a.scalar_type() == at::kBFloat16) {
    mma_kernel<true><<<1, 32, 0, c10::cuda::getCurrentCUDAStream()>>>(ap, bp, d.data_ptr<float>());
  } else {
    mma_kernel<false><<<1, 32, 0, c10::cuda::getCurrentCUDAStream()>>>(ap, bp, d.data_ptr<float>());
  }
  return d;
}

}  // namespace

TORCH_LIBRARY(simt_selftest, m) {
  m.def("run(str kernel, int threads, int dynamic_smem=0) -> Tensor", &run);
  m.def("mma(Tensor a, Tensor b) -> Tensor", &mma);
}
