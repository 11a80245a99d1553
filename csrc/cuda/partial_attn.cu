// CUDA kernel of partial_attn: exact attention for any set of query positions against a full or compressed
// cache. Same semantics and tiling idea as csrc/cpu/partial_attn.cpp: queries sorted by position within each
// sequence, one block per (query tile, KV head) holding every query head of the group (GQA reads each K/V tile
// once), 32-key tiles staged in shared memory in fp32, online softmax, tiles no query can see skipped.
// This first version computes on CUDA cores (fp32 FMAs); a tensor-core (mma/wgmma) path is the next step and
// needs a GPU to be developed and measured.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../checks.h"

namespace semshare {
namespace {

constexpr int kBlockK = 32;  // keys per tile: one per lane
constexpr int kRows = 32;    // query x head-in-group rows per block
constexpr int kWarps = 4;

struct AttnArgs {
  const int64_t* order;    // [Nq] queries sorted by (sequence, position)
  const int64_t* tiles;    // [n_tiles, 3]: sequence, first and end index into order
  const int64_t* q_pos;    // [Nq]
  const int64_t* kv_pos;   // [Nk] or nullptr (positions 0..n-1 within each sequence)
  const int64_t* cu_k;     // [B + 1]
  int64_t qs0, qs1, ks0, ks1, vs0, vs1, os0, os1;
  int64_t q_heads, group, head_dim, v_head_dim;
  float scale;
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
    partial_attn_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const scalar_t* __restrict__ v, scalar_t* __restrict__ out, float* __restrict__ lse,
                        AttnArgs a) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, G = a.group;
  extern __shared__ float smem[];
  float* Qs = smem;                          // [kRows][D], scaled
  float* Ks = Qs + kRows * D;                // [kBlockK][D + 1]: the pad keeps lanes on distinct banks
  float* Vs = Ks + kBlockK * (D + 1);        // [kBlockK][Dv]
  float* Os = Vs + kBlockK * Dv;             // [kRows][Dv]
  float* Ms = Os + kRows * Dv;               // [kRows]
  float* Ls = Ms + kRows;                    // [kRows]
  float* Ps = Ls + kRows;                    // [kWarps][kBlockK]
  __shared__ int64_t key_pos[kBlockK];
  __shared__ int64_t row_pos[kRows];
  __shared__ int skip;

  const int64_t b = a.tiles[3 * blockIdx.x], t0 = a.tiles[3 * blockIdx.x + 1], t1 = a.tiles[3 * blockIdx.x + 2];
  const int64_t g = blockIdx.y, nq = t1 - t0, rows = nq * G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int64_t row = e / D, d = e % D, i = a.order[t0 + row / G], h = g * G + row % G;
    Qs[e] = static_cast<float>(q[i * a.qs0 + h * a.qs1 + d]) * a.scale;
  }
  for (int64_t e = threadIdx.x; e < rows * Dv; e += blockDim.x) Os[e] = 0.0f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    Ms[r] = -INFINITY;
    Ls[r] = 0.0f;
    row_pos[r] = a.q_pos[a.order[t0 + r / G]];
  }
  __syncthreads();
  const int64_t q_max = row_pos[rows - 1];  // sorted: the last query of the tile sees the most
  const int64_t k0 = a.cu_k[b], k1 = a.cu_k[b + 1];

  for (int64_t j0 = k0; j0 < k1; j0 += kBlockK) {
    const int64_t nk = min(static_cast<int64_t>(kBlockK), k1 - j0);
    if (warp == 0) {
      const int64_t p = lane < nk ? (a.kv_pos ? a.kv_pos[j0 + lane] : j0 + lane - k0) : -1;
      key_pos[lane] = p;
      const bool seen = p >= 0 && p <= q_max;
      const bool any = __any_sync(0xffffffffu, seen);
      if (lane == 0) skip = !any;
    }
    __syncthreads();
    if (skip) continue;  // uniform: no query of the tile sees a key of this tile
    for (int64_t e = threadIdx.x; e < kBlockK * D; e += blockDim.x) {
      const int64_t j = e / D, d = e % D;
      Ks[j * (D + 1) + d] = j < nk ? static_cast<float>(k[(j0 + j) * a.ks0 + g * a.ks1 + d]) : 0.0f;
    }
    for (int64_t e = threadIdx.x; e < kBlockK * Dv; e += blockDim.x) {
      const int64_t j = e / Dv, d = e % Dv;
      Vs[e] = j < nk ? static_cast<float>(v[(j0 + j) * a.vs0 + g * a.vs1 + d]) : 0.0f;
    }
    __syncthreads();

    for (int64_t row = warp; row < rows; row += kWarps) {  // a row belongs to one warp for the whole kernel
      const float* qr = Qs + row * D;
      const float* kr = Ks + lane * (D + 1);
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s = fmaf(qr[d], kr[d], s);
      const int64_t p = key_pos[lane];
      const bool visible = lane < nk && p >= 0 && p <= row_pos[row];
      s = visible ? s : -INFINITY;
      const float tile_max = warp_max(s);
      if (tile_max == -INFINITY) continue;  // uniform per warp: this row sees nothing here
      const float m_old = Ms[row], m_new = fmaxf(m_old, tile_max);
      const float alpha = expf(m_old - m_new);  // 0 on the first visible tile
      const float pj = visible ? expf(s - m_new) : 0.0f;
      const float sum = warp_sum(pj);
      Ps[warp * kBlockK + lane] = pj;
      __syncwarp();
      if (lane == 0) {
        Ls[row] = Ls[row] * alpha + sum;
        Ms[row] = m_new;
      }
      for (int64_t e = lane; e < Dv; e += 32) {
        float acc = Os[row * Dv + e] * alpha;
        for (int64_t j = 0; j < nk; ++j) acc = fmaf(Ps[warp * kBlockK + j], Vs[j * Dv + e], acc);
        Os[row * Dv + e] = acc;
      }
      __syncwarp();
    }
    __syncthreads();
  }

  for (int64_t e = threadIdx.x; e < rows * Dv; e += blockDim.x) {
    const int64_t row = e / Dv, d = e % Dv, i = a.order[t0 + row / G], h = g * G + row % G;
    const float l = Ls[row];
    out[i * a.os0 + h * a.os1 + d] = static_cast<scalar_t>(l > 0.0f ? Os[e] / l : 0.0f);
  }
  for (int64_t row = threadIdx.x; row < rows; row += blockDim.x) {
    const int64_t i = a.order[t0 + row / G], h = g * G + row % G;
    lse[i * a.q_heads + h] = Ls[row] > 0.0f ? Ms[row] + logf(Ls[row]) : -INFINITY;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> partial_attn_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& q_pos, const std::optional<at::Tensor>& kv_pos,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k,
                                                     std::optional<double> scale) {
  const PartialAttnShape s = check_partial_attn_args(q, k, v, q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.nq, s.q_heads, s.v_head_dim}, q.options());
  at::Tensor lse = at::empty({s.nq, s.q_heads}, q.options().dtype(at::kFloat));
  if (s.nq == 0) return {out, lse};
  const int64_t G = s.q_heads / s.kv_heads;
  TORCH_CHECK(G <= kRows, "q: the CUDA kernel takes at most ", kRows, " query heads per KV head, got ", G);

  // Queries sorted by (sequence, position): a stable sort by position, then a stable sort by sequence.
  const auto long_opts = q.options().dtype(at::kLong);
  std::vector<int64_t> counts(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) counts[b] = s.cu_q[b + 1] - s.cu_q[b];
  const at::Tensor seq = at::repeat_interleave(at::arange(s.batch, long_opts),
                                               at::tensor(counts, at::kLong).to(q.device()));
  const at::Tensor by_pos = at::argsort(q_pos, /*stable=*/true);
  const at::Tensor order = by_pos.index_select(0, at::argsort(seq.index_select(0, by_pos), /*stable=*/true));

  const int64_t tile_q = std::max<int64_t>(1, kRows / G);
  std::vector<int64_t> tiles;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t = s.cu_q[b]; t < s.cu_q[b + 1]; t += tile_q) {
      tiles.insert(tiles.end(), {b, t, std::min(t + tile_q, s.cu_q[b + 1])});
    }
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 3;
  const at::Tensor tiles_d = at::tensor(tiles, at::kLong).to(q.device());
  const at::Tensor cu_k = at::tensor(s.cu_k, at::kLong).to(q.device());
  const at::Tensor q_pos_c = q_pos.contiguous();
  at::Tensor kv_pos_c;
  if (kv_pos.has_value()) kv_pos_c = kv_pos->contiguous();

  AttnArgs a{order.data_ptr<int64_t>(), tiles_d.data_ptr<int64_t>(), q_pos_c.data_ptr<int64_t>(),
             kv_pos.has_value() ? kv_pos_c.data_ptr<int64_t>() : nullptr, cu_k.data_ptr<int64_t>(),
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
             out.stride(1), s.q_heads, G, s.head_dim, s.v_head_dim, static_cast<float>(s.scale)};
  const int64_t D = s.head_dim, Dv = s.v_head_dim;
  const size_t smem = sizeof(float) * (kRows * D + kBlockK * (D + 1) + kBlockK * Dv + kRows * Dv + 2 * kRows +
                                       kWarps * kBlockK);
  TORCH_CHECK(n_tiles <= INT32_MAX && s.kv_heads <= 65535, "q: too many query tiles or KV heads for one launch");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(s.kv_heads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "partial_attn_cuda", [&] {
    auto kernel = partial_attn_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<grid, kWarps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(semshare, CUDA, m) { m.impl("partial_attn", &partial_attn_cuda); }

}  // namespace semshare
