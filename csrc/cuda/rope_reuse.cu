// CUDA kernel of rope_reuse_: gather reference K/V into target slots, re-rotating K by the RoPE position delta.
// Same semantics as csrc/cpu/rope_reuse.cpp; the argument checks are shared (csrc/checks.h).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../cache_view.h"
#include "../checks.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace semshare {
namespace {

struct RopeArgs {
  CacheView kd, vd, ks, vs;
  const int64_t* src;
  const int64_t* dst;
  const int64_t* delta;
  const float* inv_freq;
  int64_t t_src, t_dst, heads, head_dim, v_head_dim, half;
  bool neox;
};

// One block per (pair, layer); all layers of all pairs in one launch (more than 2^31 - 1 pairs: a few, see
// launch.cuh). The block's prologue, shared by both kernels: its pair's rows of the four caches, and when the pair
// rotates, its cos/sin (precise sincosf: the build has no --use_fast_math; the angle in fp32, as the spec fixes it)
// computed once into shared memory `cs` [2 * half]. False when the pair is skipped (negative index; out of range
// only under CUDA-graph capture, where the host check cannot run).
template <typename scalar_t>
struct PairRows {
  const scalar_t* kin;
  scalar_t* kout;
  const scalar_t* vin;
  scalar_t* vout;
  bool rotate;
};

template <typename scalar_t>
__device__ __forceinline__ bool block_pair(const RopeArgs& a, float* cs, PairRows<scalar_t>& r) {
  const int64_t p = blockIdx.x, l = blockIdx.y;
  const int64_t si = a.src[p], di = a.dst[p];
  if (si < 0 || di < 0 || si >= a.t_src || di >= a.t_dst) return false;  // uniform per block
  const int64_t dl = a.delta[p];
  r.rotate = dl != 0 && a.half > 0;
  if (r.rotate) {
    for (int64_t i = threadIdx.x; i < a.half; i += blockDim.x) {
      float s, c;
      sincosf(static_cast<float>(dl) * a.inv_freq[i], &s, &c);
      cs[i] = c;
      cs[a.half + i] = s;
    }
    __syncthreads();
  }
  r.kin = reinterpret_cast<const scalar_t*>(a.ks.base) + l * a.ks.layer + si * a.ks.token;
  r.kout = reinterpret_cast<scalar_t*>(a.kd.base) + l * a.kd.layer + di * a.kd.token;
  r.vin = reinterpret_cast<const scalar_t*>(a.vs.base) + l * a.vs.layer + si * a.vs.token;
  r.vout = reinterpret_cast<scalar_t*>(a.vd.base) + l * a.vd.layer + di * a.vd.token;
  return true;
}

// Element by element: any strides. Threads sweep heads x rotary pairs for K and heads x dims for V.
template <typename scalar_t>
__global__ void rope_reuse_kernel(RopeArgs a) {
  extern __shared__ float cs[];
  PairRows<scalar_t> r;
  if (!block_pair(a, cs, r)) return;
  const int64_t heads = a.heads, head_dim = a.head_dim, v_head_dim = a.v_head_dim, half = a.half;
  for (int64_t e = threadIdx.x; e < heads * v_head_dim; e += blockDim.x) {
    const int64_t h = e / v_head_dim, d = e % v_head_dim;
    r.vout[h * a.vd.head + d] = r.vin[h * a.vs.head + d];
  }
  const int64_t rot = r.rotate ? 2 * half : 0, tail = head_dim - rot;
  for (int64_t e = threadIdx.x; e < heads * tail; e += blockDim.x) {  // delta 0 (bit-exact), or dims past rotary_dim
    const int64_t h = e / tail, d = rot + e % tail;
    r.kout[h * a.kd.head + d] = r.kin[h * a.ks.head + d];
  }
  if (!r.rotate) return;
  for (int64_t e = threadIdx.x; e < heads * half; e += blockDim.x) {
    const int64_t h = e / half, i = e % half;
    const int64_t x = a.neox ? i : 2 * i, y = a.neox ? i + half : 2 * i + 1;
    const float x1 = static_cast<float>(r.kin[h * a.ks.head + x]), x2 = static_cast<float>(r.kin[h * a.ks.head + y]);
    const float c = cs[i], s = cs[half + i];
    r.kout[h * a.kd.head + x] = static_cast<scalar_t>(x1 * c - x2 * s);
    r.kout[h * a.kd.head + y] = static_cast<scalar_t>(x2 * c + x1 * s);
  }
}

// A 16-byte chunk as two 64-bit words; elements are read and written by constant shifts, so the chunk stays in
// registers (a union with scalar_t[] made the compiler split the stores).
template <typename scalar_t>
struct Chunk {
  static constexpr int kVec = 16 / sizeof(scalar_t), kBits = 8 * sizeof(scalar_t);
  static constexpr unsigned long long kMask = kBits == 64 ? ~0ull : (1ull << kBits) - 1;
  ulonglong2 w;

  __device__ __forceinline__ unsigned long long& word(int j) { return j * kBits < 64 ? w.x : w.y; }
  __device__ __forceinline__ float get(int j) {
    const uint64_t b = (word(j) >> (j * kBits % 64)) & kMask;
    if constexpr (sizeof(scalar_t) == 2) {
      return static_cast<float>(scalar_t(static_cast<uint16_t>(b), scalar_t::from_bits()));
    } else if constexpr (sizeof(scalar_t) == 4) {
      return __uint_as_float(static_cast<uint32_t>(b));
    } else {
      return static_cast<float>(__longlong_as_double(static_cast<long long>(b)));
    }
  }
  __device__ __forceinline__ void set(int j, float f) {
    uint64_t b;
    if constexpr (sizeof(scalar_t) == 2) {
      b = static_cast<scalar_t>(f).x;
    } else if constexpr (sizeof(scalar_t) == 4) {
      b = __float_as_uint(f);
    } else {
      b = static_cast<uint64_t>(__double_as_longlong(static_cast<double>(f)));
    }
    const int shift = j * kBits % 64;
    word(j) = (word(j) & ~(kMask << shift)) | (b << shift);
  }
};

// The same work in 16-byte chunks, for caches whose rows and strides are 16-byte aligned (every dense cache and
// its slices by layer, token or head): each thread moves whole chunks, every load and store one 128-bit access.
// NeoX pairs (i, i + half) sit in two chunks at the same offset of each half; interleaved pairs (2i, 2i+1) sit
// inside one chunk. Needs head_dim, v_head_dim and half the rotary dim to be whole chunks.
template <typename scalar_t>
__global__ void rope_reuse_vec_kernel(RopeArgs a) {
  using C = Chunk<scalar_t>;
  constexpr int kVec = C::kVec;
  extern __shared__ float cs[];
  PairRows<scalar_t> r;
  if (!block_pair(a, cs, r)) return;
  const int64_t heads = a.heads, half = a.half;
  const int64_t v_chunks = a.v_head_dim / kVec;
  for (int64_t e = threadIdx.x; e < heads * v_chunks; e += blockDim.x) {
    const int64_t h = e / v_chunks, d = (e % v_chunks) * kVec;
    store16(r.vout + h * a.vd.head + d, load16(r.vin + h * a.vs.head + d));
  }
  const int64_t rot = r.rotate ? 2 * half : 0, copy_chunks = (a.head_dim - rot) / kVec;
  for (int64_t e = threadIdx.x; e < heads * copy_chunks; e += blockDim.x) {  // delta 0, or dims past rotary_dim
    const int64_t h = e / copy_chunks, d = rot + (e % copy_chunks) * kVec;
    store16(r.kout + h * a.kd.head + d, load16(r.kin + h * a.ks.head + d));
  }
  if (!r.rotate) return;
  if (a.neox) {
    const int64_t half_chunks = half / kVec;
    for (int64_t e = threadIdx.x; e < heads * half_chunks; e += blockDim.x) {
      const int64_t h = e / half_chunks, i0 = (e % half_chunks) * kVec;
      C x{load16(r.kin + h * a.ks.head + i0)}, y{load16(r.kin + h * a.ks.head + half + i0)};
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float x1 = x.get(j), x2 = y.get(j);
        const float c = cs[i0 + j], s = cs[half + i0 + j];
        x.set(j, x1 * c - x2 * s);
        y.set(j, x2 * c + x1 * s);
      }
      store16(r.kout + h * a.kd.head + i0, x.w);
      store16(r.kout + h * a.kd.head + half + i0, y.w);
    }
  } else {
    const int64_t rot_chunks = rot / kVec;
    for (int64_t e = threadIdx.x; e < heads * rot_chunks; e += blockDim.x) {
      const int64_t h = e / rot_chunks, d0 = (e % rot_chunks) * kVec;
      C x{load16(r.kin + h * a.ks.head + d0)};
#pragma unroll
      for (int j = 0; j < kVec; j += 2) {
        const float x1 = x.get(j), x2 = x.get(j + 1);
        const float c = cs[(d0 + j) / 2], s = cs[half + (d0 + j) / 2];
        x.set(j, x1 * c - x2 * s);
        x.set(j + 1, x2 * c + x1 * s);
      }
      store16(r.kout + h * a.kd.head + d0, x.w);
    }
  }
}

}  // namespace

void rope_reuse_cuda(const at::Tensor& k_dst, const at::Tensor& v_dst, const at::Tensor& k_src,
                     const at::Tensor& v_src, const at::Tensor& src_idx, const at::Tensor& dst_idx,
                     const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  // Index values are checked on the host (a sync) except while the stream is captured into a CUDA graph, where a
  // sync is an error: there the kernels skip out-of-range pairs.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(k_dst.device().index()), &capture));
  const RopeReuseShape s = check_rope_reuse_args(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq,
                                                 /*check_index_values=*/capture == cudaStreamCaptureStatusNone);
  if (s.pairs == 0 || s.layers == 0) return;
  const c10::cuda::CUDAGuard guard(k_dst.device());
  TORCH_CHECK(s.layers <= 65535, "k_dst: at most 65535 layers in one call, got ", s.layers);
  const at::Tensor src_c = src_idx.contiguous(), dst_c = dst_idx.contiguous(), delta_c = delta.contiguous();
  const at::Tensor freq_c = inv_freq.contiguous();
  const int64_t max_pairs = max_grid_x(k_dst.get_device());
  const int threads = 128;
  const size_t smem = 2 * s.half_rotary * sizeof(float);
  const int64_t vec = 16 / static_cast<int64_t>(k_dst.element_size());
  const bool chunked = s.head_dim % vec == 0 && s.v_head_dim % vec == 0 && s.half_rotary % vec == 0 &&
                       rows_aligned(k_dst, vec) && rows_aligned(v_dst, vec) && rows_aligned(k_src, vec) &&
                       rows_aligned(v_src, vec);
  const RopeArgs a{view_of(k_dst), view_of(v_dst), view_of(k_src), view_of(v_src), src_c.data_ptr<int64_t>(),
                   dst_c.data_ptr<int64_t>(), delta_c.data_ptr<int64_t>(), freq_c.data_ptr<float>(), s.t_src,
                   s.t_dst, s.heads, s.head_dim, s.v_head_dim, s.half_rotary, neox};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_dst.scalar_type(), "rope_reuse_cuda", [&] {
    auto kernel = chunked ? rope_reuse_vec_kernel<scalar_t> : rope_reuse_kernel<scalar_t>;
    for (int64_t p0 = 0; p0 < s.pairs; p0 += max_pairs) {  // one block per pair: at most max_pairs per launch
      RopeArgs c = a;
      c.src += p0;
      c.dst += p0;
      c.delta += p0;
      const dim3 grid(static_cast<unsigned>(std::min(max_pairs, s.pairs - p0)), static_cast<unsigned>(s.layers));
      kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

TORCH_LIBRARY_IMPL(semshare, CUDA, m) { m.impl("rope_reuse_", &rope_reuse_cuda); }

}  // namespace semshare
