// CUDA kernels of the LSH family: simhash (sign-random-projection codes) and hamming_topk (nearest codes).
// Same semantics as csrc/cpu/lsh.cpp; the argument checks are shared (csrc/checks.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "launch.cuh"

namespace semshare {
namespace {

// One warp per (row, 64-bit word), from `first_warp` on: lanes read 32 + 32 consecutive projections (coalesced)
// and two ballots pack their signs, bit b at position b % 64 of word b / 64.
__global__ void pack_signs_kernel(const float* __restrict__ proj, int64_t rows, int64_t bits, int64_t words,
                                  int64_t first_warp, int64_t* __restrict__ out) {
  const int64_t warp = first_warp + (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * words) return;  // uniform per warp: the whole warp leaves together
  const int64_t r = warp / words, w = warp % words;
  const int64_t b_lo = w * 64 + lane, b_hi = b_lo + 32;
  const bool lo = b_lo < bits && proj[r * bits + b_lo] >= 0.0f;
  const bool hi = b_hi < bits && proj[r * bits + b_hi] >= 0.0f;
  const uint32_t m_lo = __ballot_sync(0xffffffffu, lo), m_hi = __ballot_sync(0xffffffffu, hi);
  if (lane == 0) out[r * words + w] = static_cast<int64_t>((static_cast<uint64_t>(m_hi) << 32) | m_lo);
}

constexpr int kWarps = 8;        // queries per block: they share each tile of reference codes
constexpr int kTile = 256;       // reference codes per shared-memory tile

// Distance of the query to the code whose word w is c[w * kTile] (the tile is word-major, see below).
__device__ __forceinline__ int hamming(const uint64_t* q, const uint64_t* c, int words) {
  int h = 0;
  for (int w = 0; w < words; ++w) h += __popcll(q[w] ^ c[w * kTile]);
  return h;
}

// One warp per query. Pass 1 builds the histogram of distances; the cut distance follows from it (every code
// nearer than the cut is taken, then the first ones at the cut). Pass 2 walks the codes in index order, 32 at a
// time, and places each taken code at its bucket's running offset plus its rank among equal distances in the
// chunk (__match_any_sync): ascending distance, ties to the smaller index, exactly as the CPU counting sort.
__global__ void hamming_topk_kernel(const uint64_t* __restrict__ q_codes, int64_t q_stride,
                                    const uint64_t* __restrict__ k_codes, int64_t nq, int64_t nk, int words,
                                    int64_t k, int32_t* __restrict__ dist_out, int64_t* __restrict__ idx_out) {
  extern __shared__ unsigned char smem_raw[];
  // [words][kTile]: word-major, so the 32 lanes' reads of one word are 32 consecutive 8-byte words (no bank
  // conflicts); code-major they were 32 bytes apart, a 4-way conflict at 256 bits.
  uint64_t* tile = reinterpret_cast<uint64_t*>(smem_raw);
  uint64_t* qbuf = tile + kTile * words;                                   // [kWarps * words]
  int* hist = reinterpret_cast<int*>(qbuf + kWarps * words);               // [kWarps * (64 * words + 1)]
  const int bins = 64 * words + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = qi < nq;
  uint64_t* q = qbuf + warp * words;
  int* h = hist + warp * bins;
  for (int w = lane; w < words; w += 32) q[w] = active ? q_codes[qi * q_stride + w] : 0;
  for (int b = lane; b < bins; b += 32) h[b] = 0;
  __syncthreads();

  __shared__ int cut_s[kWarps];
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) {
      // Every lane's pass-0 atomics must land before lane 0 reads the histogram (found by the SIMT emulator: on
      // a GPU, lanes of a warp are not guaranteed to have reconverged at the end of the loop).
      __syncthreads();
      if (active && lane == 0) {  // cut and bucket offsets (exclusive prefix sums up to the cut)
        int64_t below = 0;
        int cut = 0;
        while (below + h[cut] < k) below += h[cut++];
        int64_t offset = 0;
        for (int b = 0; b <= cut; ++b) {
          const int c = h[b];
          h[b] = static_cast<int>(offset);
          offset += c;
        }
        cut_s[warp] = cut;
      }
      __syncthreads();
    }
    for (int64_t t0 = 0; t0 < nk; t0 += kTile) {
      const int64_t n = min(static_cast<int64_t>(kTile), nk - t0);
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n * words; i += blockDim.x) {  // coalesced global reads
        tile[(i % words) * kTile + i / words] = k_codes[t0 * words + i];
      }
      __syncthreads();
      if (!active) continue;
      for (int64_t c0 = 0; c0 < n; c0 += 32) {
        const int64_t j = c0 + lane;
        const int d = j < n ? hamming(q, tile + j, words) : 0x7fffffff;
        if (pass == 0) {
          if (j < n) atomicAdd(&h[d], 1);
          continue;
        }
        const int cut = cut_s[warp];
        const uint32_t same = __match_any_sync(0xffffffffu, d);
        const int rank = __popc(same & ((1u << lane) - 1u));
        const bool leader = rank == 0;
        const bool eligible = j < n && d <= cut;
        const int64_t slot = eligible ? h[d] + rank : 0;
        __syncwarp();
        if (eligible && slot < k) {  // nearer buckets end below k; the cut bucket is cut at k
          dist_out[qi * k + slot] = d;
          idx_out[qi * k + slot] = t0 + j;
        }
        if (eligible && leader) h[d] += __popc(same);
        __syncwarp();
      }
    }
  }
}

}  // namespace

at::Tensor simhash_cuda(const at::Tensor& x, const at::Tensor& planes) {
  check_simhash_args(x, planes);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t bits = planes.size(1), words = simhash_words(bits);
  const at::Tensor proj = simhash_projection(x, planes);
  const at::Tensor out = simhash_codes_for(x, bits);
  const int64_t rows = proj.size(0);
  if (rows * words == 0) return out;
  const int threads = 256, warps_per_block = threads / 32;
  const int64_t warps = rows * words, max_blocks = max_grid_x(x.get_device());
  for (int64_t w0 = 0; w0 < warps; w0 += max_blocks * warps_per_block) {
    const int64_t blocks = std::min(max_blocks, (warps - w0 + warps_per_block - 1) / warps_per_block);
    pack_signs_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        proj.data_ptr<float>(), rows, bits, words, w0, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& q_codes, const at::Tensor& k_codes,
                                                     int64_t k) {
  check_hamming_topk_args(q_codes, k_codes, k);
  const int64_t words = q_codes.size(1);  // 1 to kMaxCodeWords (checks.h)
  const c10::cuda::CUDAGuard guard(q_codes.device());
  const int64_t nq = q_codes.size(0), nk = k_codes.size(0);
  // The distance histogram and bucket offsets are 32-bit shared-memory counters.
  TORCH_CHECK(nk <= INT32_MAX, "k_codes: the CUDA kernel takes at most ", INT32_MAX, " codes, got ", nk);
  at::Tensor dist = at::empty({nq, k}, q_codes.options().dtype(at::kInt));
  at::Tensor idx = at::empty({nq, k}, q_codes.options());
  if (nq == 0) return {dist, idx};
  const at::Tensor kc = k_codes.contiguous();
  const size_t smem = (kTile * words + kWarps * words) * sizeof(uint64_t) + kWarps * (64 * words + 1) * sizeof(int);
  C10_CUDA_CHECK(cudaFuncSetAttribute(hamming_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const auto* qp = reinterpret_cast<const uint64_t*>(q_codes.data_ptr<int64_t>());
  const int64_t q_stride = q_codes.stride(0), max_queries = max_grid_x(q_codes.get_device()) * kWarps;
  for (int64_t q0 = 0; q0 < nq; q0 += max_queries) {  // kWarps queries per block
    const int64_t n = std::min(max_queries, nq - q0);
    hamming_topk_kernel<<<(n + kWarps - 1) / kWarps, kWarps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
        qp + q0 * q_stride, q_stride, reinterpret_cast<const uint64_t*>(kc.data_ptr<int64_t>()), n, nk,
        static_cast<int>(words), k, dist.data_ptr<int32_t>() + q0 * k, idx.data_ptr<int64_t>() + q0 * k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dist, idx};
}

TORCH_LIBRARY_IMPL(semshare, CUDA, m) {
  m.impl("simhash", &simhash_cuda);
  m.impl("hamming_topk", &hamming_topk_cuda);
}

}  // namespace semshare
