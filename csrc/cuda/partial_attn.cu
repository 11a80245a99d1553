// CUDA kernel of partial_attn: exact attention for any set of query positions against a full or compressed
// cache. Same semantics and tiling idea as csrc/cpu/partial_attn.cpp: queries sorted by position within each
// sequence, one block per (query tile, KV head) holding every query head of the group (GQA reads each K/V tile
// once), 32-key tiles staged in shared memory in fp32, online softmax, tiles no query can see (past the tile's last
// query, before the sliding window of its first) skipped. Soft-capping is applied to the logits before the softmax;
// attention sinks join the denominator once, where a row is finished (in the merge when the keys are split).
// Two kernels: fp16/bf16 with head_dim == v_head_dim in {64, 128} run on the tensor cores (mma.sync m16n8k16,
// FlashAttention-2 style: S and O in registers, P re-used as the A operand of P.V without leaving registers; keys
// split across blocks and merged after when there are too few blocks to fill the device, see kv_splits);
// everything else (fp32, other head dims, unaligned views) runs on the CUDA-core kernel, fp32 FMAs throughout.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../checks.h"
#include "ptx.cuh"

namespace semshare {
namespace {

constexpr int kBlockK = 32;  // keys per tile: one per lane
constexpr int kRows = 32;    // query x head-in-group rows per block
constexpr int kWarps = 4;

// Arguments of both kernels.
struct AttnArgs {
  const int64_t* order;    // [Nq] queries sorted by (sequence, position)
  const int64_t* tiles;    // [n_tiles, 3]: sequence, first and end index into order; nullptr: one sequence
  const int64_t* q_pos;    // [Nq]
  const int64_t* kv_pos;   // [Nk] or nullptr (positions 0..n-1 within each sequence)
  const int64_t* cu_k;     // [B + 1]; nullptr: one sequence of all Nk keys
  int64_t tile_q, n_tiles, nq_total, nk_total;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1, os0, os1;  // strides in elements
  int64_t q_heads, group, head_dim, v_head_dim;
  float scale;
  int64_t window;       // > 0: key visible only if q_pos - window < kv_pos; -1: no window
  float softcap;        // > 0: logits become softcap * tanh(logit / softcap)
  const float* sinks;   // [Hq] sink logits, or nullptr
  // Split-KV (tensor-core kernel only): blockIdx.z takes keys [z * split_keys, (z + 1) * split_keys) of its
  // sequence (a multiple of the key tile) and writes its normalised fp32 output and lse to o_part [n_splits, Nq, Hq,
  // Dv] and lse_part [n_splits, Nq, Hq]; merge_splits_kernel combines them. n_splits == 1: the kernel writes out
  // and lse itself.
  int64_t n_splits, split_keys;
  float* o_part;
  float* lse_part;
};

// NaN-sticky (fmaxf drops a NaN, and a row whose only visible logits are NaN would look like one that sees nothing).
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = isnan(v) || isnan(w) ? NAN : fmaxf(v, w);
  }
  return v;
}

// q_pos - window without int64 overflow (window > 0), as csrc/checks.h window_start.
__device__ __forceinline__ int64_t window_start_d(int64_t qp, int64_t window) {
  constexpr int64_t kMin = static_cast<int64_t>(-9223372036854775807LL - 1);
  return qp < kMin + window ? kMin : qp - window;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Whether a key at position p is visible to a query at position qp (docs/contract.md 3.4); p < 0 is an empty slot.
__device__ __forceinline__ bool key_visible(int64_t p, int64_t qp, int64_t window) {
  return p >= 0 && p <= qp && (window <= 0 || p > window_start_d(qp, window));
}

template <bool kLog2>
__device__ __forceinline__ float exp_in(float x) {
  return kLog2 ? exp2f(x) : expf(x);
}

// A sink logit joins a finished row's softmax denominator, not its output. m and l are the row's running max and
// sum and `sink` its sink logit, all in log2 units (the exp2 softmax) or all natural. Returns the factor that turns
// the row's accumulated output into its output (1 / l without a sink; 0 when the row saw no key and has no sink)
// and leaves m and l including the sink.
// A NaN in the row's logits (l NaN) or its sink comes out NaN, never as "no visible key" (l == 0); a sink of +inf
// takes all the weight (output 0, lse +inf) from a row without NaN. A row with a +inf logit (m = FLT_MAX, l = +inf,
// output infinite or NaN) comes out NaN with lse +inf, beside any sink.
template <bool kLog2>
__device__ __forceinline__ float fold_sink(float sink, float& m, float& l) {
  if (sink == -INFINITY) return l != 0.0f ? 1.0f / l : 0.0f;
  const float m_new = isnan(sink) || sink == INFINITY ? sink : fmaxf(m, sink);
  const float o_scale = l != 0.0f ? exp_in<kLog2>(m - m_new) : 0.0f;
  l = m_new == INFINITY ? (isnan(l) ? l : 1.0f) : l * o_scale + exp_in<kLog2>(sink - m_new);  // NaN stays NaN
  m = m_new;
  return o_scale / l;
}

// Keys [k0, end) a query at position qp can see with default positions, clamped before k0 is added: a position may
// be as large as int64 allows.
__device__ __forceinline__ int64_t seen_end(int64_t k0, int64_t k1, int64_t qp) {
  return qp >= k1 - k0 ? k1 : k0 + max(qp + 1, int64_t{0});
}

// The first key of the tile, `tile` keys wide, where the window of a query at qp starts (default positions).
__device__ __forceinline__ int64_t window_begin(int64_t k0, int64_t k1, int64_t qp, int64_t window, int64_t tile) {
  return k0 + min(max(window_start_d(qp, window) + 1, int64_t{0}), k1 - k0) / tile * tile;
}

// A tile's sequence, first and end index into `order`, and its sequence's key range. Without cu_seqlens there is one
// sequence and the tiles are plain cuts of it: nothing to build on the host or copy to the device, so such calls
// have no host-device traffic and can be captured in a CUDA graph.
struct TileBounds {
  int64_t b, t0, t1, k0, k1;
};

__device__ __forceinline__ TileBounds tile_bounds(const AttnArgs& a, int64_t tile) {
  TileBounds t;
  if (a.tiles) {
    t.b = a.tiles[3 * tile];
    t.t0 = a.tiles[3 * tile + 1];
    t.t1 = a.tiles[3 * tile + 2];
  } else {
    t.b = 0;
    t.t0 = tile * a.tile_q;
    t.t1 = min(t.t0 + a.tile_q, a.nq_total);
  }
  t.k0 = a.cu_k ? a.cu_k[t.b] : 0;
  t.k1 = a.cu_k ? a.cu_k[t.b + 1] : a.nk_total;
  return t;
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

  const TileBounds tb = tile_bounds(a, blockIdx.x);
  const int64_t t0 = tb.t0, t1 = tb.t1, k0 = tb.k0, k1 = tb.k1;
  const int64_t g = blockIdx.y, nq = t1 - t0, rows = nq * G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // With a cap, Q carries scale / softcap, so a logit s comes out ready for softcap * tanh(s).
  const float q_scale = a.softcap > 0.0f ? a.scale / a.softcap : a.scale;
  for (int64_t e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int64_t row = e / D, d = e % D, i = a.order[t0 + row / G], h = g * G + row % G;
    Qs[e] = static_cast<float>(q[i * a.qs0 + h * a.qs1 + d]) * q_scale;
  }
  for (int64_t e = threadIdx.x; e < rows * Dv; e += blockDim.x) Os[e] = 0.0f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    Ms[r] = -INFINITY;
    Ls[r] = 0.0f;
    row_pos[r] = a.q_pos[a.order[t0 + r / G]];
  }
  __syncthreads();
  // Sorted: the tile's last query sees the latest keys, its first query's window starts earliest.
  const int64_t q_min = row_pos[0], q_max = row_pos[rows - 1];
  // With default positions (key j of the sequence is position j), tiles before the first query's window are
  // never visited.
  const int64_t j_first = a.kv_pos || a.window <= 0 ? k0 : window_begin(k0, k1, q_min, a.window, kBlockK);

  for (int64_t j0 = j_first; j0 < k1; j0 += kBlockK) {
    const int64_t nk = min(static_cast<int64_t>(kBlockK), k1 - j0);
    // The barrier's OR, not a shared flag: warp 0 writes the next tile's key_pos right after a skipped tile, and a
    // flag written there could be read by a warp still deciding about this one.
    bool seen = false;
    if (warp == 0) {
      const int64_t p = lane < nk ? (a.kv_pos ? a.kv_pos[j0 + lane] : j0 + lane - k0) : -1;
      key_pos[lane] = p;
      seen = p >= 0 && p <= q_max && (a.window <= 0 || p > window_start_d(q_min, a.window));
    }
    if (!__syncthreads_or(seen)) continue;  // uniform: no query of the tile sees a key of this tile
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
      if (a.softcap > 0.0f) s = a.softcap * tanhf(s);
      const bool visible = lane < nk && key_visible(key_pos[lane], row_pos[row], a.window);
      s = visible ? s : -INFINITY;
      const float tile_max = warp_max(s);
      if (tile_max == -INFINITY) continue;  // uniform per warp: this row sees nothing here
      // The running max stops at FLT_MAX: a +inf logit weighs e^(inf - FLT_MAX) = +inf, so lse = +inf and out NaN
      // as in the oracle (with the max at +inf, e^(inf - inf) would make the sum NaN).
      const float m_old = Ms[row], m_new = fminf(fmaxf(m_old, tile_max), FLT_MAX);
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

  // Finish each row: its lse, and in Ls the factor from accumulated to final output (sinks folded in).
  for (int64_t row = threadIdx.x; row < rows; row += blockDim.x) {
    const int64_t i = a.order[t0 + row / G], h = g * G + row % G;
    const float l = Ls[row];
    if (a.sinks) {  // in natural units: Ms * log2(e) could overflow where Ms does not
      float m = Ms[row], l2 = l;
      Ls[row] = fold_sink<false>(a.sinks[h], m, l2);
      lse[i * a.q_heads + h] = l2 != 0.0f ? m + logf(l2) : -INFINITY;
    } else {
      Ls[row] = l != 0.0f ? 1.0f / l : 0.0f;
      lse[i * a.q_heads + h] = l != 0.0f ? Ms[row] + logf(l) : -INFINITY;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < rows * Dv; e += blockDim.x) {
    const int64_t row = e / Dv, d = e % Dv, i = a.order[t0 + row / G], h = g * G + row % G;
    out[i * a.os0 + h * a.os1 + d] = static_cast<scalar_t>(Os[e] * Ls[row]);
  }
}

// ---- tensor-core kernel ---------------------------------------------------------------------------------------
// One block per (query tile, KV head): 4 warps, each owning 16 rows (query x head-in-group) of a 64-row tile.
// K/V tiles of 64 keys go global -> shared by cp.async into two stages, so that tile i + 1 is in flight while
// tile i is computed; both are row-major with 16 bytes of padding per row (every 8-row ldmatrix phase then hits
// 32 distinct banks). S = Q K^T by mma.sync with Q's fragments held in registers for the whole kernel and K's
// fragments from ldmatrix; the online softmax runs on S's accumulator fragments (a row lives in the 4 lanes of a
// quad); P (rounded to the input type, as FlashAttention does) is the A operand of O += P V, whose B fragments come
// from ldmatrix.trans of the row-major V tile. Fragment layouts are PTX's mma.m16n8k16 (.row.col):
// lane = 4 * group + thread_in_group.
constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 16 * kMmaWarps;  // rows per block
constexpr int kMmaKeys = 64;              // keys per K/V tile
constexpr int kSmemPad = 8;               // 16 bytes of padding per shared-memory row
constexpr int kStages = 2;                // K/V tiles in shared memory: the one computed, the one arriving

// Dynamic shared memory of the tensor-core kernel: kStages x (K tile, V tile) of kMmaKeys padded rows.
constexpr size_t mma_smem_bytes(int64_t head_dim) {
  return static_cast<size_t>(kStages) * 2 * kMmaKeys * (head_dim + kSmemPad) * sizeof(uint16_t);
}

// Two floats rounded to the input type, the first in the low half (the lower column of a fragment pair).
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kBf16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

__device__ __forceinline__ uint32_t load_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <bool kBf16, int D>
__global__ void __launch_bounds__(kMmaWarps * 32)
    partial_attn_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                            const uint16_t* __restrict__ v, uint16_t* __restrict__ out, float* __restrict__ lse,
                            AttnArgs a) {  // q strides even, k/v strides multiples of 8 (see use_mma_kernel)
  constexpr int kStride = D + kSmemPad, kChunks = D / 8, kTileElems = kMmaKeys * kStride;
  extern __shared__ uint16_t kv_tiles[];  // [stage][K, V][key][kStride]; mma_smem_bytes(D)
  __shared__ int64_t key_pos[kMmaKeys];

  // Tiles are in ascending position order; the last ones see the most keys, so they start first.
  const TileBounds tb = tile_bounds(a, a.n_tiles - 1 - blockIdx.x);
  const int64_t t0 = tb.t0, t1 = tb.t1, k0 = tb.k0, k1 = tb.k1;
  const int64_t kvh = blockIdx.y, G = a.group, nq = t1 - t0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;

  // This lane's two rows: grp and grp + 8 of its warp's 16 (fragment registers 0/2 and 1/3 of A, 0-1 and 2-3 of C).
  int64_t row_i[2], row_h[2], row_pos[2];
  const uint16_t* q_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = warp * 16 + grp + 8 * r, ql = row / G;
    const bool valid = ql < nq;
    row_i[r] = valid ? a.order[t0 + ql] : -1;
    row_h[r] = kvh * G + row % G;
    row_pos[r] = valid ? a.q_pos[row_i[r]] : -1;  // -1: a padding row sees no key
    q_row[r] = valid ? q + row_i[r] * a.qs0 + row_h[r] * a.qs1 : nullptr;
  }
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + 2 * tig;
    qf[kk][0] = q_row[0] ? load_u32(q_row[0] + c) : 0u;
    qf[kk][1] = q_row[1] ? load_u32(q_row[1] + c) : 0u;
    qf[kk][2] = q_row[0] ? load_u32(q_row[0] + c + 8) : 0u;
    qf[kk][3] = q_row[1] ? load_u32(q_row[1] + c + 8) : 0u;
  }

  // Sorted: the tile's last query sees the latest keys, its first query's window starts earliest.
  const int64_t q_min = a.q_pos[a.order[t0]], q_max = a.q_pos[a.order[t1 - 1]];
  constexpr float kLog2e = 1.4426950408889634f;  // the softmax runs on exp2
  const float scale_log2 = a.scale * kLog2e;
  // Soft-capping: logit = softcap * tanh(scale * q.k / softcap), times log2(e) for exp2.
  const float cap_in = a.softcap > 0.0f ? a.scale / a.softcap : 0.0f, cap_out = a.softcap * kLog2e;
  // Default positions are the key indices: keys past q_max are invisible to the whole tile, and so are whole
  // tiles before the first query's window.
  int64_t k_begin = k0, k_end = a.kv_pos ? k1 : seen_end(k0, k1, q_max);
  if (!a.kv_pos && a.window > 0) k_begin = window_begin(k0, k1, q_min, a.window, kMmaKeys);
  if (a.n_splits > 1) {  // this block's slice: whole key tiles, so no tile reaches into the next slice
    const int64_t slice = k0 + static_cast<int64_t>(blockIdx.z) * a.split_keys;
    k_begin = min(k_end, max(k_begin, slice));
    k_end = min(k_end, slice + a.split_keys);
  }

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this lane's share of the row sum

  // Issue one K/V tile's copies into a stage, as one cp.async group. Keys past k1 are zeros: P is 0 there, and
  // 0 * a stale NaN would not be. (Row j0 is a valid source address for them; nothing is read.)
  const auto load_tile = [&](int64_t j0, int stage) {
    uint16_t* ks = kv_tiles + stage * 2 * kTileElems;
    uint16_t* vs = ks + kTileElems;
    for (int e = threadIdx.x; e < kMmaKeys * kChunks; e += blockDim.x) {  // consecutive threads: one key's row
      const int j = e / kChunks, c = e % kChunks;
      const bool valid = j0 + j < k1;
      const int64_t row = valid ? j0 + j : j0;
      cp_async_16(ks + j * kStride + c * 8, k + row * a.ks0 + kvh * a.ks1 + c * 8, valid);
      cp_async_16(vs + j * kStride + c * 8, v + row * a.vs0 + kvh * a.vs1 + c * 8, valid);
    }
    cp_async_commit();
  };
  if (k_begin < k_end) load_tile(k_begin, 0);

  const int mat = lane / 8, mat_row = lane % 8;  // this lane's ldmatrix row: row mat_row of matrix mat
  int stage = 0;
  for (int64_t j0 = k_begin; j0 < k_end; j0 += kMmaKeys, stage ^= 1) {
    // The next tile goes into the other stage, whose last readers passed the barrier ending the previous
    // iteration. Past the last tile an empty group keeps the count of groups in flight at one.
    if (j0 + kMmaKeys < k_end) {
      load_tile(j0 + kMmaKeys, stage ^ 1);
    } else {
      cp_async_commit();
    }
    bool seen = false;
    if (threadIdx.x < kMmaKeys) {
      const int64_t j = j0 + threadIdx.x;
      const int64_t p = j < k1 ? (a.kv_pos ? a.kv_pos[j] : j - k0) : -1;
      key_pos[threadIdx.x] = p;
      seen = p >= 0 && p <= q_max && (a.window <= 0 || p > window_start_d(q_min, a.window));
    }
    cp_async_wait<1>();  // this thread's copies of tile j0 have landed; the barrier below publishes everyone's
    if (!__syncthreads_or(seen)) continue;  // uniform: no query of the tile sees a key of this tile
    const uint16_t* ks = kv_tiles + stage * 2 * kTileElems;
    const uint16_t* vs = ks + kTileElems;

    // S = Q K^T: one ldmatrix.x4 per 16 dims and two 8-key n-tiles; matrix m: keys of n-tile 2 np + m / 2,
    // dims kk * 16 + 8 (m % 2), so registers 0-1 are n-tile 2 np's B fragment and 2-3 n-tile 2 np + 1's.
    float s[kMmaKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kMmaKeys / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + ((2 * np + mat / 2) * 8 + mat_row) * kStride + kk * 16 + 8 * (mat % 2));
        mma_m16n8k16<kBf16>(s[2 * np], qf[kk], b[0], b[1]);
        mma_m16n8k16<kBf16>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    // Online softmax. C fragment: s[nt][0..1] row grp, s[nt][2..3] row grp + 8; keys nt * 8 + 2 * tig (+1).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool visible = key_visible(key_pos[nt * 8 + 2 * tig + (e & 1)], row_pos[e / 2], a.window);
        const float logit = a.softcap > 0.0f ? cap_out * tanhf(s[nt][e] * cap_in) : s[nt][e] * scale_log2;
        s[nt][e] = visible ? logit : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
      }
    }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // a row's 64 scores sit in the 4 lanes of a quad
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Stops at FLT_MAX, as in the CUDA-core kernel: a +inf logit gives p = +inf, lse +inf and out NaN.
      const float m_new = fminf(fmaxf(m[r], tile_max[r]), FLT_MAX);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: p = exp2(-inf) = 0, no NaN
      const float alpha = exp2f(m[r] - m_use[r]);   // 0 while m was -inf
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * r] *= alpha;
        o[dn][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e / 2]);
        l[e / 2] += s[nt][e];
      }
    }

    // O += P V. P's C fragments of n-tiles 2kk and 2kk+1 are exactly the A fragment of keys 16kk..16kk+15.
    // V's B fragments by ldmatrix.trans, one x4 per two 8-dim n-tiles: matrix m holds keys 16 kk + 8 (m % 2),
    // dims of n-tile 2 dp + m / 2.
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      const uint32_t pa[4] = {pack2<kBf16>(s[2 * kk][0], s[2 * kk][1]), pack2<kBf16>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<kBf16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<kBf16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (kk * 16 + 8 * (mat % 2) + mat_row) * kStride + (2 * dp + mat / 2) * 8);
        mma_m16n8k16<kBf16>(o[2 * dp], pa, b[0], b[1]);
        mma_m16n8k16<kBf16>(o[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage and key_pos before they are written again
  }

  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (row_i[r] < 0) continue;
    // Sinks join the denominator once: here without a split, in merge_splits_kernel with one.
    const float sink = a.sinks && a.n_splits == 1 ? a.sinks[row_h[r]] * kLog2e : -INFINITY;
    const float inv = fold_sink<true>(sink, m[r], l[r]);
    const float row_lse = l[r] != 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    if (a.n_splits > 1) {
      const int64_t part_row = (blockIdx.z * a.nq_total + row_i[r]) * a.q_heads + row_h[r];
      float* orow = a.o_part + part_row * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<float2*>(orow + dn * 8 + 2 * tig) = make_float2(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
      }
      if (tig == 0) a.lse_part[part_row] = row_lse;
      continue;
    }
    uint16_t* orow = out + row_i[r] * a.os0 + row_h[r] * a.os1;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * tig) = pack2<kBf16>(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
    }
    if (tig == 0) lse[row_i[r] * a.q_heads + row_h[r]] = row_lse;
  }
}

// Split-KV merge: one warp per (query, head) row. Each slice's output is normalised over its own keys, so the
// row's output is the slices' outputs weighted by exp(lse_z - lse_max), and its lse is the log of their sum.
// A sink adds exp(sink - lse_max) to the sum and nothing to the output. A row no slice saw anything for gets
// zeros and -inf (the sink's logit, with sinks), as without splits. A term at lse_max weighs 1, not e^(inf - inf):
// a slice with a +inf logit (lse +inf, output NaN) makes the row NaN with lse +inf; a +inf sink alone, 0 and +inf.
template <bool kBf16, int D>
__global__ void __launch_bounds__(kMmaWarps * 32)
    merge_splits_kernel(uint16_t* __restrict__ out, float* __restrict__ lse, AttnArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMmaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = a.nq_total * a.q_heads;  // also the stride between slices in o_part / lse_part
  if (row >= rows) return;  // whole warps: a warp never straddles this
  const int64_t i = row / a.q_heads, h = row % a.q_heads;
  const float sink = a.sinks ? a.sinks[h] : -INFINITY;
  uint16_t* orow = out + i * a.os0 + h * a.os1;
  float lse_max = sink;
  bool nan_row = isnan(sink);  // fmaxf drops NaN: a NaN slice or sink is carried here, and the row comes out NaN
  for (int64_t z = 0; z < a.n_splits; ++z) {
    const float lz = a.lse_part[z * rows + row];
    nan_row = nan_row || isnan(lz);
    lse_max = fmaxf(lse_max, lz);
  }
  float acc[D / 64][2] = {};
  float weight_sum = sink == -INFINITY ? 0.0f : sink == lse_max ? 1.0f : expf(sink - lse_max);
  if (lse_max != -INFINITY) {
    for (int64_t z = 0; z < a.n_splits; ++z) {
      const float lz = a.lse_part[z * rows + row];
      const float w = lz == lse_max ? 1.0f : expf(lz - lse_max);  // 0 for a slice that saw nothing
      weight_sum += w;
      const float* part = a.o_part + (z * rows + row) * D;
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {  // lane's columns: 64 c + 2 lane and the next one
        const float2 p = *reinterpret_cast<const float2*>(part + 64 * c + 2 * lane);
        acc[c][0] = fmaf(w, p.x, acc[c][0]);
        acc[c][1] = fmaf(w, p.y, acc[c][1]);
      }
    }
  }
  if (nan_row) weight_sum = NAN;
  const float inv = weight_sum != 0.0f ? 1.0f / weight_sum : 0.0f;
#pragma unroll
  for (int c = 0; c < D / 64; ++c) {
    *reinterpret_cast<uint32_t*>(orow + 64 * c + 2 * lane) = pack2<kBf16>(acc[c][0] * inv, acc[c][1] * inv);
  }
  if (lane == 0) lse[row] = weight_sum != 0.0f ? lse_max + logf(weight_sum) : -INFINITY;
}

}  // namespace

// Queries sorted by (sequence, position) and cut into tiles of at most tile_q queries that never span sequences.
// One sequence (no cu_seqlens): a device argsort and no tile table (see tile_bounds).
struct QueryTiles {
  at::Tensor order, tiles;  // [Nq] and [n_tiles, 3] (sequence, first, end) on the device; tiles undefined: one sequence
  int64_t n_tiles;
};

QueryTiles tile_queries(const PartialAttnShape& s, const at::Tensor& q_pos, int64_t tile_q, bool ragged) {
  TORCH_CHECK(s.kv_heads <= 65535, "k: at most 65535 KV heads in one launch, got ", s.kv_heads);
  if (!ragged) {
    const int64_t n_tiles = (s.nq + tile_q - 1) / tile_q;
    TORCH_CHECK(n_tiles <= INT32_MAX, "q: too many query tiles for one launch");
    return {at::argsort(q_pos, /*stable=*/true), at::Tensor(), n_tiles};
  }
  const auto long_opts = q_pos.options().dtype(at::kLong);
  std::vector<int64_t> counts(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) counts[b] = s.cu_q[b + 1] - s.cu_q[b];
  const at::Tensor seq = at::repeat_interleave(at::arange(s.batch, long_opts),
                                               at::tensor(counts, at::kLong).to(q_pos.device()));
  // A stable sort by position, then a stable sort by sequence.
  const at::Tensor by_pos = at::argsort(q_pos, /*stable=*/true);
  const at::Tensor order = by_pos.index_select(0, at::argsort(seq.index_select(0, by_pos), /*stable=*/true));
  std::vector<int64_t> tiles;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t = s.cu_q[b]; t < s.cu_q[b + 1]; t += tile_q) {
      tiles.insert(tiles.end(), {b, t, std::min(t + tile_q, s.cu_q[b + 1])});
    }
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) / 3;
  TORCH_CHECK(n_tiles <= INT32_MAX, "q: too many query tiles for one launch");
  return {order, at::tensor(tiles, at::kLong).to(q_pos.device()), n_tiles};
}

// The tensor-core kernel takes fp16/bf16 with head_dim == v_head_dim in {64, 128}, up to 64 query heads per KV
// head, q rows 4-byte aligned (its fragments are 32-bit loads) and K/V rows 16-byte aligned (16-byte loads).
bool use_mma_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PartialAttnShape& s) {
  const bool half_type = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool dims = s.head_dim == s.v_head_dim && (s.head_dim == 64 || s.head_dim == 128);
  return half_type && dims && s.q_heads / s.kv_heads <= kMmaRows && rows_aligned(q, 2) && rows_aligned(k, 8) &&
         rows_aligned(v, 8);
}

// Split-KV, as in flash-decoding: with too few (query tile, KV head) blocks to fill the device once -- few queries,
// which is what a low recompute ratio or decoding gives -- each block's key range is cut into slices that separate
// blocks run, and merge_splits_kernel combines them. Slices of at least kMinSplitKeys keys keep the merge's extra
// traffic (one fp32 row per slice and row) small next to the K/V tiles a slice reads. The slice length is one
// number for the whole launch: the grid takes as long as its longest block, and that is one slice whatever the
// tiles' (causal) key ranges; a tile with a short range leaves its later slices empty.
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kMaxSplits = 64;

struct KvSplits {
  int64_t n, keys;  // slices and keys per slice; n == 1: no split
};

// Once per tensor-core kernel and device: raise its dynamic shared-memory limit (mma_smem_bytes is fixed by the
// kernel's head_dim) and ask how many of its blocks fit on an SM. Both are driver calls that would otherwise run in
// every layer's attention.
template <typename Kernel>
int mma_blocks_per_sm(Kernel kernel, size_t smem, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMmaWarps * 32, smem));
  return known.emplace(key, std::max(per_sm, 1)).first->second;
}

KvSplits kv_splits(int per_sm, int64_t blocks, int64_t longest_keys, int device) {
  int sms = 0;  // a cached device attribute: cheap, and read per call so the emulator's SIMT_EMU_SMS can change
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t slots = static_cast<int64_t>(sms) * per_sm;  // blocks resident at once
  const int64_t want = std::min({slots / blocks, kMaxSplits, longest_keys / kMinSplitKeys});  // at most one wave
  if (want <= 1) return {1, longest_keys};
  const int64_t key_tiles = (longest_keys + kMmaKeys - 1) / kMmaKeys;
  const int64_t keys = (key_tiles + want - 1) / want * kMmaKeys;
  return {(longest_keys + keys - 1) / keys, keys};  // rounding up to whole tiles can leave fewer slices
}

std::tuple<at::Tensor, at::Tensor> partial_attn_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& q_pos, const std::optional<at::Tensor>& kv_pos,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k,
                                                     std::optional<double> scale, int64_t window, double softcap,
                                                     const std::optional<at::Tensor>& sinks) {
  const PartialAttnShape s =
      check_partial_attn_args(q, k, v, q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, scale, window, softcap, sinks);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.nq, s.q_heads, s.v_head_dim}, q.options());
  at::Tensor lse = at::empty({s.nq, s.q_heads}, q.options().dtype(at::kFloat));
  if (s.nq == 0) return {out, lse};
  const int64_t G = s.q_heads / s.kv_heads;
  const bool ragged = cu_seqlens_q.has_value();
  at::Tensor cu_k;
  if (ragged) cu_k = at::tensor(s.cu_k, at::kLong).to(q.device());
  const int64_t* cu_k_ptr = ragged ? cu_k.data_ptr<int64_t>() : nullptr;
  const at::Tensor q_pos_c = q_pos.contiguous();
  at::Tensor kv_pos_c;
  if (kv_pos.has_value()) kv_pos_c = kv_pos->contiguous();
  const int64_t* kv_pos_ptr = kv_pos.has_value() ? kv_pos_c.data_ptr<int64_t>() : nullptr;
  at::Tensor sinks_c;
  if (sinks.has_value()) sinks_c = sinks->contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const bool mma = use_mma_kernel(q, k, v, s);
  TORCH_CHECK(mma || G <= kRows, "q: the CUDA kernel takes at most ", kRows, " query heads per KV head, got ", G);
  const int64_t tile_q = mma ? kMmaRows / G : std::max<int64_t>(1, kRows / G);
  const QueryTiles t = tile_queries(s, q_pos_c, tile_q, ragged);
  AttnArgs a{t.order.data_ptr<int64_t>(), ragged ? t.tiles.data_ptr<int64_t>() : nullptr,
             q_pos_c.data_ptr<int64_t>(), kv_pos_ptr, cu_k_ptr, tile_q, t.n_tiles, s.nq, s.nk,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
             out.stride(1), s.q_heads, G, s.head_dim, s.v_head_dim, static_cast<float>(s.scale), s.window,
             static_cast<float>(s.softcap), sinks.has_value() ? sinks_c.data_ptr<float>() : nullptr,
             /*n_splits=*/1, /*split_keys=*/s.nk, nullptr, nullptr};
  const dim3 grid(static_cast<unsigned>(t.n_tiles), static_cast<unsigned>(s.kv_heads));

  if (mma) {
    const auto* qp = static_cast<const uint16_t*>(q.data_ptr());
    const auto* kp = static_cast<const uint16_t*>(k.data_ptr());
    const auto* vp = static_cast<const uint16_t*>(v.data_ptr());
    auto* op = static_cast<uint16_t*>(out.data_ptr());
    const size_t smem = mma_smem_bytes(s.head_dim);  // 70 KB at head_dim 128: over the 48 KB default
    int64_t longest_keys = s.nk;
    if (ragged) {
      longest_keys = 0;
      for (int64_t b = 0; b < s.batch; ++b) longest_keys = std::max(longest_keys, s.cu_k[b + 1] - s.cu_k[b]);
    }
    at::Tensor o_part, lse_part;  // split-KV workspace
    const auto launch = [&](auto kernel, auto merge) {
      const int per_sm = mma_blocks_per_sm(kernel, smem, q.get_device());
      const KvSplits splits = kv_splits(per_sm, t.n_tiles * s.kv_heads, longest_keys, q.get_device());
      a.n_splits = splits.n;
      a.split_keys = splits.keys;
      if (a.n_splits > 1) {
        o_part = at::empty({a.n_splits, s.nq, s.q_heads, s.v_head_dim}, q.options().dtype(at::kFloat));
        lse_part = at::empty({a.n_splits, s.nq, s.q_heads}, q.options().dtype(at::kFloat));
        a.o_part = o_part.data_ptr<float>();
        a.lse_part = lse_part.data_ptr<float>();
      }
      const dim3 split_grid(grid.x, grid.y, static_cast<unsigned>(a.n_splits));
      kernel<<<split_grid, kMmaWarps * 32, smem, stream>>>(qp, kp, vp, op, lse.data_ptr<float>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (a.n_splits > 1) {
        const int64_t merge_blocks = (s.nq * s.q_heads + kMmaWarps - 1) / kMmaWarps;
        TORCH_CHECK(merge_blocks <= INT32_MAX, "q: too many query rows for one launch");
        merge<<<static_cast<unsigned>(merge_blocks), kMmaWarps * 32, 0, stream>>>(op, lse.data_ptr<float>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    if (s.head_dim == 64) {
      bf16 ? launch(partial_attn_mma_kernel<true, 64>, merge_splits_kernel<true, 64>)
           : launch(partial_attn_mma_kernel<false, 64>, merge_splits_kernel<false, 64>);
    } else {
      bf16 ? launch(partial_attn_mma_kernel<true, 128>, merge_splits_kernel<true, 128>)
           : launch(partial_attn_mma_kernel<false, 128>, merge_splits_kernel<false, 128>);
    }
    return {out, lse};
  }

  const int64_t D = s.head_dim, Dv = s.v_head_dim;
  const size_t smem = sizeof(float) * (kRows * D + kBlockK * (D + 1) + kBlockK * Dv + kRows * Dv + 2 * kRows +
                                       kWarps * kBlockK);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "partial_attn_cuda", [&] {
    auto kernel = partial_attn_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<grid, kWarps * 32, smem, stream>>>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                lse.data_ptr<float>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(semshare, CUDA, m) { m.impl("partial_attn", &partial_attn_cuda); }

}  // namespace semshare
