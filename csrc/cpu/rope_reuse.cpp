// CPU kernel of rope_reuse_: gather reference K/V into target slots, re-rotating K by the RoPE position delta.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../cache_view.h"
#include "../checks.h"

namespace semshare {
namespace {

// A call whose pairs write more than this streams its rows past the caches (non-temporal stores): a row store that
// misses the cache first reads the line it overwrites, so a gather larger than the last-level cache (32 MiB on
// the EPYC it was measured on) moves 3 bytes per byte copied; streamed, 2. Smaller calls (the vLLM worker's, one
// layer of blocks at a time) keep ordinary stores, so that the rows they write stay cached for what reads them next.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// Copy one row of `bytes`; streamed when asked and the destination and size are 16-byte multiples (SSE2, every
// x86-64), an ordinary copy otherwise.
inline void store_row(void* dst, const void* src, size_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) % 16) == 0 && bytes % 16 == 0) {
    __m128i* d = static_cast<__m128i*>(dst);
    const __m128i* s = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Streamed stores are weakly ordered: fence them before the thread's share of the work counts as done.
inline void fence_streams(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#endif
}

// Strides of a token-major cache seen as [L, T, H, D] (the layer stride is unused when L == 1).
template <typename scalar_t>
void rope_reuse_kernel(const RopeReuseShape& s, const at::Tensor& k_dst, const at::Tensor& v_dst,
                       const at::Tensor& k_src, const at::Tensor& v_src, const at::Tensor& src_idx,
                       const at::Tensor& dst_idx, const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  const CacheView kd = view_of(k_dst), vd = view_of(v_dst), ks = view_of(k_src), vs = view_of(v_src);
  const at::Tensor src_c = src_idx.contiguous(), dst_c = dst_idx.contiguous(), delta_c = delta.contiguous();
  const at::Tensor freq_c = inv_freq.contiguous();
  const int64_t* src = src_c.data_ptr<int64_t>();
  const int64_t* dst = dst_c.data_ptr<int64_t>();
  const int64_t* dl = delta_c.data_ptr<int64_t>();
  const float* freq = freq_c.data_ptr<float>();
  const int64_t half = s.half_rotary, rot = 2 * half, D = s.head_dim;
  const size_t esz = sizeof(scalar_t);
  const int64_t per_pair = s.layers * s.heads * (s.head_dim + s.v_head_dim);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(per_pair, 1));
  int64_t valid = 0;  // the pairs that write (skipped ones do not)
  for (int64_t p = 0; p < s.pairs; ++p) valid += src[p] >= 0 && dst[p] >= 0;
  const bool stream = valid * per_pair * static_cast<int64_t>(esz) > kStreamBytes;

  at::parallel_for(0, s.pairs, grain, [&](int64_t begin, int64_t end) {
    // cos/sin of this pair's angles, shared by every layer and head of the pair. A streamed call builds a rotated
    // key row in `krow` and stores it whole; others rotate into the cache row itself.
    std::vector<float> cos_t(half), sin_t(half);
    std::vector<scalar_t> krow(stream ? D : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t si = src[p], di = dst[p];
      if (si < 0 || di < 0) continue;
      const bool rotate = dl[p] != 0 && half > 0;
      if (rotate) {
        const float step = static_cast<float>(dl[p]);
        for (int64_t i = 0; i < half; ++i) {
          const float angle = step * freq[i];  // fp32, as the spec fixes it; precise libm sin/cos below
          cos_t[i] = std::cos(angle);
          sin_t[i] = std::sin(angle);
        }
      }
      for (int64_t l = 0; l < s.layers; ++l) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const scalar_t* kin =
              reinterpret_cast<const scalar_t*>(ks.base) + l * ks.layer + si * ks.token + h * ks.head;
          scalar_t* kout = reinterpret_cast<scalar_t*>(kd.base) + l * kd.layer + di * kd.token + h * kd.head;
          const scalar_t* vin =
              reinterpret_cast<const scalar_t*>(vs.base) + l * vs.layer + si * vs.token + h * vs.head;
          scalar_t* vout = reinterpret_cast<scalar_t*>(vd.base) + l * vd.layer + di * vd.token + h * vd.head;
          store_row(vout, vin, s.v_head_dim * esz, stream);
          if (!rotate) {  // delta 0 is a bit-exact copy (x*1 - y*0 would turn -0.0 into +0.0)
            store_row(kout, kin, D * esz, stream);
            continue;
          }
          scalar_t* k = stream ? krow.data() : kout;
          if (neox) {  // pairs (i, i + half): HF rotate_half
            for (int64_t i = 0; i < half; ++i) {
              const float x1 = static_cast<float>(kin[i]), x2 = static_cast<float>(kin[i + half]);
              k[i] = static_cast<scalar_t>(x1 * cos_t[i] - x2 * sin_t[i]);
              k[i + half] = static_cast<scalar_t>(x2 * cos_t[i] + x1 * sin_t[i]);
            }
          } else {  // pairs (2i, 2i + 1): GPT-J / Meta interleaved layout
            for (int64_t i = 0; i < half; ++i) {
              const float x1 = static_cast<float>(kin[2 * i]), x2 = static_cast<float>(kin[2 * i + 1]);
              k[2 * i] = static_cast<scalar_t>(x1 * cos_t[i] - x2 * sin_t[i]);
              k[2 * i + 1] = static_cast<scalar_t>(x2 * cos_t[i] + x1 * sin_t[i]);
            }
          }
          if (rot < D) std::memcpy(k + rot, kin + rot, (D - rot) * esz);  // dims past rotary_dim: unchanged
          if (stream) store_row(kout, k, D * esz, stream);
        }
      }
    }
    fence_streams(stream);
  });
}

}  // namespace

void rope_reuse_cpu(const at::Tensor& k_dst, const at::Tensor& v_dst, const at::Tensor& k_src,
                    const at::Tensor& v_src, const at::Tensor& src_idx, const at::Tensor& dst_idx,
                    const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  const RopeReuseShape s = check_rope_reuse_args(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq);
  if (s.pairs == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_dst.scalar_type(), "rope_reuse_cpu", [&] {
    rope_reuse_kernel<scalar_t>(s, k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox);
  });
}

TORCH_LIBRARY_IMPL(semshare, CPU, m) { m.impl("rope_reuse_", &rope_reuse_cpu); }

}  // namespace semshare
