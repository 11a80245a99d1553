// CUDA kernel of rope_reuse_: gather reference K/V into target slots, re-rotating K by the RoPE position delta.
// Same semantics as csrc/cpu/rope_reuse.cpp; the argument checks are shared (csrc/checks.h).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"

namespace semshare {
namespace {

struct CacheView {
  char* base;
  int64_t layer, token, head;  // strides in elements; layer stride 0 for 3-D caches
};

CacheView view_of(const at::Tensor& t) {
  return {static_cast<char*>(t.data_ptr()), t.dim() == 4 ? t.stride(0) : 0, t.stride(-3), t.stride(-2)};
}

// One block per (pair, layer). The pair's cos/sin are computed once into shared memory (precise sincosf: the
// build has no --use_fast_math), then the block's threads sweep heads x rotary pairs for K and heads x dims for V.
// All layers of all pairs in one launch.
template <typename scalar_t>
__global__ void rope_reuse_kernel(CacheView kd, CacheView vd, CacheView ks, CacheView vs,
                                  const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                                  const int64_t* __restrict__ delta, const float* __restrict__ inv_freq,
                                  int64_t heads, int64_t head_dim, int64_t v_head_dim, int64_t half, bool neox) {
  extern __shared__ float cs[];  // [2 * half]: cos, then sin
  const int64_t p = blockIdx.x, l = blockIdx.y;
  const int64_t si = src[p], di = dst[p];
  if (si < 0 || di < 0) return;  // uniform per block
  const int64_t dl = delta[p];
  const bool rotate = dl != 0 && half > 0;
  if (rotate) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      float s, c;
      sincosf(static_cast<float>(dl) * inv_freq[i], &s, &c);  // the angle in fp32, as the spec fixes it
      cs[i] = c;
      cs[half + i] = s;
    }
    __syncthreads();
  }
  const scalar_t* kin = reinterpret_cast<const scalar_t*>(ks.base) + l * ks.layer + si * ks.token;
  scalar_t* kout = reinterpret_cast<scalar_t*>(kd.base) + l * kd.layer + di * kd.token;
  const scalar_t* vin = reinterpret_cast<const scalar_t*>(vs.base) + l * vs.layer + si * vs.token;
  scalar_t* vout = reinterpret_cast<scalar_t*>(vd.base) + l * vd.layer + di * vd.token;

  for (int64_t e = threadIdx.x; e < heads * v_head_dim; e += blockDim.x) {
    const int64_t h = e / v_head_dim, d = e % v_head_dim;
    vout[h * vd.head + d] = vin[h * vs.head + d];
  }
  if (!rotate) {  // delta 0: a bit-exact copy
    for (int64_t e = threadIdx.x; e < heads * head_dim; e += blockDim.x) {
      const int64_t h = e / head_dim, d = e % head_dim;
      kout[h * kd.head + d] = kin[h * ks.head + d];
    }
    return;
  }
  const int64_t rot = 2 * half, tail = head_dim - rot;
  for (int64_t e = threadIdx.x; e < heads * half; e += blockDim.x) {
    const int64_t h = e / half, i = e % half;
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x1 = static_cast<float>(kin[h * ks.head + a]), x2 = static_cast<float>(kin[h * ks.head + b]);
    const float c = cs[i], s = cs[half + i];
    kout[h * kd.head + a] = static_cast<scalar_t>(x1 * c - x2 * s);
    kout[h * kd.head + b] = static_cast<scalar_t>(x2 * c + x1 * s);
  }
  for (int64_t e = threadIdx.x; e < heads * tail; e += blockDim.x) {  // dims past rotary_dim: unchanged
    const int64_t h = e / tail, d = rot + e % tail;
    kout[h * kd.head + d] = kin[h * ks.head + d];
  }
}

}  // namespace

void rope_reuse_cuda(const at::Tensor& k_dst, const at::Tensor& v_dst, const at::Tensor& k_src,
                     const at::Tensor& v_src, const at::Tensor& src_idx, const at::Tensor& dst_idx,
                     const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  const RopeReuseShape s = check_rope_reuse_args(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq);
  if (s.pairs == 0 || s.layers == 0) return;
  const c10::cuda::CUDAGuard guard(k_dst.device());
  TORCH_CHECK(s.layers <= 65535, "k_dst: at most 65535 layers in one call, got ", s.layers);
  const at::Tensor src_c = src_idx.contiguous(), dst_c = dst_idx.contiguous(), delta_c = delta.contiguous();
  const at::Tensor freq_c = inv_freq.contiguous();
  const dim3 grid(static_cast<unsigned>(s.pairs), static_cast<unsigned>(s.layers));
  const int threads = 128;
  const size_t smem = 2 * s.half_rotary * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_dst.scalar_type(), "rope_reuse_cuda", [&] {
    rope_reuse_kernel<scalar_t><<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        view_of(k_dst), view_of(v_dst), view_of(k_src), view_of(v_src), src_c.data_ptr<int64_t>(),
        dst_c.data_ptr<int64_t>(), delta_c.data_ptr<int64_t>(), freq_c.data_ptr<float>(), s.heads, s.head_dim,
        s.v_head_dim, s.half_rotary, neox);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(semshare, CUDA, m) { m.impl("rope_reuse_", &rope_reuse_cuda); }

}  // namespace semshare
