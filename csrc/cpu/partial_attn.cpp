// CPU kernel of partial_attn: exact attention for an arbitrary set of query positions against a (possibly
// compressed) KV cache. Flash-style: queries are sorted by position and tiled with the query heads of one KV head
// (GQA shares each K/V tile), keys stream through in tiles with an online softmax, so no Nq x Nk score matrix
// exists. KV tiles that no query of a tile can see (past its last query, or before the sliding window of its
// first) are skipped; tiles every query sees fully skip the mask. Soft-capping is applied to each tile's logits
// before the softmax; attention sinks join the denominator once, when a row is finished.
// Few queries (decoding, a small recompute) are a stream through K/V with little arithmetic per byte, so there
// the kernel reads fp32 K/V where they lie instead of packing them, and splits each item's keys over the threads
// (flash-decoding) when the items alone would leave threads idle; many queries pack each K/V tile once for all.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace semshare {
namespace {

// 8 fp32 lanes through the compiler's vector extension: AVX2 + FMA where the build targets it (setup.py), plain
// SSE pairs elsewhere. Kept in registers by the compiler, unlike arrays indexed at run time.
typedef float vf8 __attribute__((vector_size(32)));

constexpr int64_t kBlockK = 64;       // keys per tile: one row of S is 8 vectors
constexpr int64_t kRows = 64;         // about this many rows (query x head-in-group) per query tile
constexpr int64_t kVChunk = 16;       // V and O rows padded to whole micro-kernel columns: 2 vectors
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kMaxFloat = std::numeric_limits<float>::max();

inline vf8 splat(float x) { return vf8{x, x, x, x, x, x, x, x}; }

// Vector loads and stores through memcpy: alias-safe with the scalar accesses to the same buffers, and
// compiled to single vector moves.
inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

typedef int32_t vi8 __attribute__((vector_size(32)));

// exp for the softmax, 8 lanes at a time (std::exp does not vectorise without -ffast-math). Cephes' expf:
// n = round(x / ln 2), r = x - n ln 2 in two parts, a degree-6 polynomial, 2^n assembled in the exponent bits;
// about 1 ulp. Inputs below -87 (exp(-inf) of masked keys included) give exactly 0, so masked keys add nothing.
inline vf8 exp8(vf8 x) {
  const vf8 lo = splat(-87.0f);
  const vf8 xc = x < lo ? lo : x;
  const vf8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf8 n = (xc * 1.44269504088896341f + magic) - magic;
  vf8 r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf8 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  vf8 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const vf8 result = y * two_n;
  return x < lo ? splat(0.0f) : result;
}

inline float exp1(float x) { return exp8(splat(x))[0]; }

// tanh, 8 lanes at a time (soft-capping): Cephes' tanhf. |x| < 0.625: an odd polynomial (1-2 ulp, no
// cancellation near 0); otherwise 1 - 2 / (exp(2|x|) + 1) with the sign restored. Past |x| = 9, tanh rounds to
// +-1 in fp32, and clamping there keeps exp8 far from overflow.
inline vf8 tanh8(vf8 x) {
  const vf8 zero = splat(0.0f);
  const vf8 ax = x < zero ? -x : x;
  const vf8 z = x * x;
  vf8 p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf8 small = p * z * x + x;
  const vf8 nine = splat(9.0f);
  const vf8 e = exp8(2.0f * (ax < nine ? ax : nine));
  const vf8 big = splat(1.0f) - 2.0f / (e + 1.0f);
  const vf8 large = x < zero ? -big : big;
  return ax < splat(0.625f) ? small : large;
}

// Horizontal max and sum in three shuffle steps (halves, quarters, pairs) instead of seven scalar ones.
// NaN-sticky: a NaN lane wins (a plain `v > w ? v : w` drops it, and a row whose only visible logits are NaN
// would then look like a row that sees nothing).
inline vf8 vmax_nan(vf8 v, vf8 w) { return ((v > w) | (v != v)) ? v : w; }

inline float hmax(vf8 v) {
  v = vmax_nan(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax_nan(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = vmax_nan(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v[0];
}

inline float hsum(vf8 v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

struct AlignedBuffer {
  std::unique_ptr<float, decltype(&std::free)> ptr{nullptr, &std::free};
  explicit AlignedBuffer(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 16)) * sizeof(float) + 63) / 64) * 64;
    ptr.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ptr, "partial_attn: out of memory for a ", bytes, "-byte tile buffer");
  }
  float* get() const { return ptr.get(); }
};

// C[NR x 16] = A[NR x K] . B[K x 16] (+ row_scale[r] * C when row_scale is given), fp32. The GEMM shape of both
// S = Q K^T (A = Q rows, B = K^T tile) and O = alpha O + P V (A = P rows, B = V tile). NR = 6 gives 12 accumulators
// (2 FMA pipes x 4-5 cycles of latency need 8-10 in flight) plus 2 B vectors and 1 broadcast: 15 of AVX2's 16
// registers, and 8 loads per 12 FMAs, so the FMA pipes, not the loads, set the pace.
template <int NR>
inline void gemm_rows16(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        const float* row_scale) {
  vf8 acc[NR][2];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    if (row_scale) {
      const vf8 sr = splat(row_scale[r]);
      acc[r][0] = load8(C + r * ldc) * sr;
      acc[r][1] = load8(C + r * ldc + 8) * sr;
    } else {
      acc[r][0] = splat(0.0f);
      acc[r][1] = splat(0.0f);
    }
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const vf8 b0 = load8(B + kk * ldb), b1 = load8(B + kk * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      const vf8 a = splat(A[r * lda + kk]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r) {
    store8(C + r * ldc, acc[r][0]);
    store8(C + r * ldc + 8, acc[r][1]);
  }
}

// C[rows x cols] (cols a multiple of 16) through the 6-row micro-kernel; the last rows % 6 in one narrower call.
inline void gemm_tile(int64_t rows, int64_t cols, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, const float* row_scale) {
  for (int64_t r = 0; r < rows; r += 6) {
    const float* scale_r = row_scale ? row_scale + r : nullptr;
    for (int64_t c = 0; c < cols; c += 16) {
      const float* a = A + r * lda;
      const float* b = B + c;
      float* out = C + r * ldc + c;
      switch (std::min<int64_t>(6, rows - r)) {
        case 6: gemm_rows16<6>(K, a, lda, b, ldb, out, ldc, scale_r); break;
        case 5: gemm_rows16<5>(K, a, lda, b, ldb, out, ldc, scale_r); break;
        case 4: gemm_rows16<4>(K, a, lda, b, ldb, out, ldc, scale_r); break;
        case 3: gemm_rows16<3>(K, a, lda, b, ldb, out, ldc, scale_r); break;
        case 2: gemm_rows16<2>(K, a, lda, b, ldb, out, ldc, scale_r); break;
        default: gemm_rows16<1>(K, a, lda, b, ldb, out, ldc, scale_r); break;
      }
    }
  }
}

// The sums of eight vectors, one per lane: three rounds of pairwise adds (the hadd pattern) instead of eight
// horizontal sums.
inline vf8 hadd(vf8 a, vf8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

inline vf8 hsum8(const vf8* a) {
  const vf8 h0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));  // lanes 0-3: a0..a3's low halves, 4-7: high halves
  const vf8 h1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// S[r][j] = Q_r . K_j for the few rows of a decode-like tile, reading K where it lies (fp32 rows of D, D a multiple
// of 8, ldk apart) instead of packing it: eight keys at a time, one accumulator each, reduced together. Columns
// past nk are zero (the mask covers them).
inline void scores_direct(int64_t rows, int64_t D, int64_t nk, const float* Q, const float* K, int64_t ldk,
                          float* S) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = Q + r * D;
    float* sr = S + r * kBlockK;
    int64_t j = 0;
    for (; j + 8 <= nk; j += 8) {
      vf8 acc[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) acc[c] = splat(0.0f);
      for (int64_t d = 0; d < D; d += 8) {
        const vf8 qv = load8(qr + d);
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) acc[c] += qv * load8(K + (j + c) * ldk + d);
      }
      store8(sr + j, hsum8(acc));
    }
    for (; j < nk; ++j) {
      vf8 acc = splat(0.0f);
      for (int64_t d = 0; d < D; d += 8) acc += load8(qr + d) * load8(K + j * ldk + d);
      sr[j] = hsum(acc);
    }
    for (; j < kBlockK; ++j) sr[j] = 0.0f;
  }
}

// One KV tile for every row (query x head-in-group) of a query tile: S = Q K^T, cap, mask, online softmax,
// O += P V. With softcap > 0, Q carries scale / softcap, so the cap is softcap * tanh(S). K is either a packed tile
// (Kt[d][j], ldk == 0) or fp32 rows ldk apart; V is rows of Dvp ldv apart (packed: ldv == Dvp).
inline void attend_tile(int64_t rows, int64_t D, int64_t Dvp, int64_t nk, int64_t G, bool need_mask, float softcap,
                        const float* Q, const float* K, int64_t ldk, const float* V, int64_t ldv, const float* bias,
                        float* S, float* O, float* M, float* L, float* alpha) {
  if (ldk == 0) {
    gemm_tile(rows, kBlockK, D, Q, D, K, kBlockK, S, kBlockK, nullptr);
  } else {
    scores_direct(rows, D, nk, Q, K, ldk, S);
  }
  if (softcap > 0.0f) {
    for (int64_t i = 0; i < rows * kBlockK; i += 8) store8(S + i, softcap * tanh8(load8(S + i)));
  }

  // Online softmax per row. A row that sees nothing in this tile keeps its state: alpha 1 and P 0. Masked logits
  // are replaced by -inf, not added to it: a NaN key the row does not see (an evicted slot, a later position) must
  // not reach it.
  const vf8 neg_inf = splat(kNegInf);
  for (int64_t row = 0; row < rows; ++row) {
    float* pr = S + row * kBlockK;
    const float* br = bias + (row / G) * kBlockK;
    vf8 a[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) a[c] = need_mask ? (load8(br + 8 * c) == 0.0f ? load8(pr + 8 * c) : neg_inf)
                                                 : load8(pr + 8 * c);
    vf8 vmax = a[0];
#pragma GCC unroll 8
    for (int c = 1; c < 8; ++c) vmax = vmax_nan(vmax, a[c]);
    const float tile_max = hmax(vmax);
    if (tile_max == kNegInf) {
      alpha[row] = 1.0f;
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) store8(pr + 8 * c, splat(0.0f));
      continue;
    }
    // The running max stops at FLT_MAX: a +inf logit then weighs e^(inf - FLT_MAX) = +inf, every finite one 0, and
    // the row ends with L = +inf, so lse = +inf and out = O / L NaN, as the oracle's logsumexp and softmax (with
    // the max at +inf, e^(inf - inf) would make L NaN). exp8 is NaN at +inf: that lane is set apart after the
    // loop, only in a tile that has one (inside, the select and the logits it keeps alive cost 3-5%).
    const float m_new = std::min(std::max(M[row], tile_max), kMaxFloat);
    alpha[row] = exp1(M[row] - m_new);  // 0 on the first visible tile (M = -inf)
    const vf8 vm = splat(m_new);
    vf8 vsum = splat(0.0f);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const vf8 pc = exp8(a[c] - vm);
      vsum += pc;
      store8(pr + 8 * c, pc);
    }
    if (tile_max == kPosInf) {  // so no NaN logit here (the max is NaN-sticky): a NaN p is e^(inf - FLT_MAX)
      vsum = splat(0.0f);
      for (int c = 0; c < 8; ++c) {
        const vf8 p = load8(pr + 8 * c);
        const vf8 pc = p != p ? splat(kPosInf) : p;
        vsum += pc;
        store8(pr + 8 * c, pc);
      }
    }
    L[row] = L[row] * alpha[row] + hsum(vsum);
    M[row] = m_new;
  }

  // Keys past nk are zero padding in a packed V (and P is finite there), so the full tile depth could be used; nk
  // skips it, and is what keeps an unpacked V from being read past its end.
  gemm_tile(rows, Dvp, nk, S, kBlockK, V, ldv, O, Dvp, alpha);
}

// Split-KV, as in flash-decoding and the CUDA kernel: with too few (query tile, KV head) items to keep every thread
// busy -- decoding, or the few queries of a low recompute ratio -- each item's key range is cut into slices of whole
// tiles that run as separate items; each slice leaves its unnormalised output, running max and sum, and the slices
// are merged after. kItemsPerThread items per thread let the dynamic hand-out even out slices of unequal cost;
// slices of at least kMinSplitKeys keys keep the merge's traffic (one row per slice) small beside the K/V a slice
// reads. The split depends on the call's shape and thread count, so a query's output may differ in rounding between
// calls with different companions, as on CUDA.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kMaxSplits = 64;

// K/V are packed (fp32, K transposed) once per call into a shared buffer when more than this many query tiles of a
// sequence read each K/V tile. With fewer, a packed tile would be used once or twice and packing costs about what
// its arithmetic does: fp32 K/V are read where they lie, other dtypes converted to fp32 rows (not transposed) by
// the item that reads them, into a buffer that stays in L1 or L2.
constexpr int64_t kLocalPackTiles = 2;

// One unit of work: the queries sorted[q_begin, q_end) of sequence b, with every query head of the KV heads
// [g, g + heads_per_item), against the keys [k_begin, k_end) of the sequence (tile-aligned from its first key).
// part < 0: the whole range, finished in place; otherwise slice `slice` of `slices` of a split item whose partial
// rows start at part.
struct WorkItem {
  int64_t b, g, q_begin, q_end, k_begin, k_end, cost, part, slice, slices;
};

template <typename scalar_t>
void partial_attn_kernel(const PartialAttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& q_pos, const std::optional<at::Tensor>& kv_pos,
                         const std::optional<at::Tensor>& sinks, at::Tensor& out, at::Tensor& lse) {
  const int64_t D = s.head_dim, Dv = s.v_head_dim, G = s.q_heads / s.kv_heads;
  const int64_t Dvp = (Dv + kVChunk - 1) / kVChunk * kVChunk;  // V and O rows padded to whole accumulator blocks
  const float softcap = static_cast<float>(s.softcap);
  // With a cap, Q carries scale / softcap: the tile's logits come out ready for tanh.
  const float scale = static_cast<float>(softcap > 0.0f ? s.scale / s.softcap : s.scale);
  const int64_t window = s.window;
  at::Tensor sinks_c;
  const float* sink = nullptr;  // [Hq] or nullptr
  if (sinks.has_value()) {
    sinks_c = sinks->contiguous();
    sink = sinks_c.data_ptr<float>();
  }

  const at::Tensor qpos_c = q_pos.contiguous();
  const int64_t* qpos = qpos_c.data_ptr<int64_t>();
  at::Tensor kvpos_c;
  const int64_t* kvpos = nullptr;
  if (kv_pos.has_value()) {
    kvpos_c = kv_pos->contiguous();
    kvpos = kvpos_c.data_ptr<int64_t>();
  }

  // Queries of each sequence in position order: a tile's visible keys then end at its last query's position.
  std::vector<int64_t> order(s.nq);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    std::stable_sort(order.begin() + s.cu_q[b], order.begin() + s.cu_q[b + 1],
                     [&](int64_t a, int64_t c) { return qpos[a] < qpos[c]; });
  }

  // About kRows rows per tile, rounded so rows (queries x G) fill whole 6-row micro-kernel blocks when a nearby
  // count does (G = 3: 22 queries, 66 rows; G = 4: 18, 72; G = 8: 9, 72).
  int64_t tile_q = std::max<int64_t>(1, (kRows + G - 1) / G);
  for (int64_t t = tile_q; t * G <= kRows + kRows / 2; ++t) {
    if ((t * G) % 6 == 0) {
      tile_q = t;
      break;
    }
  }
  int64_t max_tiles_per_seq = 0, max_tile_q = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t nq_b = s.cu_q[b + 1] - s.cu_q[b];
    max_tiles_per_seq = std::max(max_tiles_per_seq, (nq_b + tile_q - 1) / tile_q);
    max_tile_q = std::max(max_tile_q, std::min(nq_b, tile_q));
  }
  const bool few_tiles = max_tiles_per_seq <= kLocalPackTiles;
  // Rows: K/V read as fp32 rows by the dot-product kernel, where they lie (fp32) or converted a tile at a time
  // (other dtypes: a shift for bf16, where packing transposed one element at a time cost about what a decode
  // call's arithmetic does). The dot products cost more per FLOP than the packed tile's micro-kernel, so other
  // dtypes take this path only while a head's rows times D stay within kRowsWork (SmolLM2's 16 queries: 48 x 64;
  // Llama-3-8B's 16, 64 x 128, measured 0.87x). k.stride(0) != 0: ldk == 0 tells attend_tile its K is a packed
  // tile, so an expanded K is packed instead.
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  constexpr int64_t kRowsWork = 4096;
  const bool rows_path = few_tiles && D % 8 == 0 && Dv % kVChunk == 0 && k.stride(0) != 0 &&
                         (kFloat || max_tile_q * G * D <= kRowsWork);
  const bool convert = rows_path && !kFloat;
  const bool local_pack = few_tiles && !rows_path, shared_pack = !few_tiles;
  // A key's row holds every KV head (768 bytes for SmolLM2); an item of one head reads a third of each (an eighth
  // for Llama-3-8B), a stride that the hardware prefetchers follow poorly, and other items read the rest of the same
  // rows at other times: on the rows path one item then takes every head and reads whole rows, one contiguous
  // stream (the key slices below keep the threads busy), 1.2-1.5x on decode calls. Packed tiles hold one head.
  const int64_t heads_per_item = rows_path ? s.kv_heads : 1;

  // Each (sequence, query tile, KV heads of an item) and the key range its queries can see: from the first query's
  // window (default positions only) to the last query's position (default positions) or the sequence's end
  // (kv_pos). A sequence without keys gets an empty range: its items only finish their rows (zeros and -inf).
  std::vector<WorkItem> items;
  int64_t longest = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t k0 = s.cu_k[b], k1 = s.cu_k[b + 1];
    for (int64_t t = s.cu_q[b]; t < s.cu_q[b + 1]; t += tile_q) {
      const int64_t t_end = std::min(t + tile_q, s.cu_q[b + 1]);
      int64_t kb = k0, ke = k1;
      if (!kvpos) {  // clamped to the sequence before adding k0: a position may be as large as int64 allows
        const int64_t n = k1 - k0, first = qpos[order[t]], last = qpos[order[t_end - 1]];
        if (window > 0) kb = k0 + std::clamp<int64_t>(window_start(first, window) + 1, 0, n) / kBlockK * kBlockK;
        ke = k0 + (last >= n ? n : std::max<int64_t>(0, last + 1));
        kb = std::min(kb, ke > k0 ? (ke - k0 - 1) / kBlockK * kBlockK + k0 : k0);
      }
      longest = std::max(longest, ke - kb);
      for (int64_t g = 0; g < s.kv_heads; g += heads_per_item) {
        items.push_back({b, g, t, t_end, kb, ke, (t_end - t) * (ke - kb + kBlockK) * heads_per_item, -1, 0, 1});
      }
    }
  }

  // How many slices: one key length for the whole call, as on CUDA (the longest item sets the pace).
  const int64_t threads = at::get_num_threads();
  int64_t split_keys = 0;
  if (threads > 1 && !items.empty()) {
    const int64_t n = static_cast<int64_t>(items.size());
    const int64_t want = std::min({(kItemsPerThread * threads + n - 1) / n, kMaxSplits, longest / kMinSplitKeys});
    if (want > 1) split_keys = ((longest + kBlockK - 1) / kBlockK + want - 1) / want * kBlockK;
  }
  int64_t part_rows = 0;  // partial rows of every split item, slice-major within an item
  if (split_keys > 0) {
    std::vector<WorkItem> split;
    for (const WorkItem& w : items) {
      const int64_t slices = (w.k_end - w.k_begin + split_keys - 1) / split_keys;
      if (slices <= 1) {
        split.push_back(w);
        continue;
      }
      const int64_t rows = (w.q_end - w.q_begin) * G * heads_per_item;
      for (int64_t z = 0; z < slices; ++z) {
        const int64_t kb = w.k_begin + z * split_keys, ke = std::min(w.k_end, kb + split_keys);
        split.push_back({w.b, w.g, w.q_begin, w.q_end, kb, ke,
                         (w.q_end - w.q_begin) * (ke - kb + kBlockK) * heads_per_item, part_rows, z, slices});
      }
      part_rows += slices * rows;
    }
    items.swap(split);
  }
  // Longest first, then handed out one at a time: causal tiles differ in cost by up to Nk / kBlockK times.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& c) { return a.cost > c.cost; });
  AlignedBuffer part_o(part_rows * Dvp), part_m(part_rows), part_l(part_rows);

  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);

  // One K/V tile of KV head g, keys [j0, j0 + nk), in fp32 and the layout the micro-kernels read (K transposed:
  // Kt[d][j]; V rows padded to Dvp); the padding is zero.
  auto pack_tile = [&](int64_t g, int64_t j0, int64_t nk, float* Kt, float* V) {
    std::fill(Kt, Kt + D * kBlockK, 0.0f);
    std::fill(V, V + kBlockK * Dvp, 0.0f);
    for (int64_t j = 0; j < nk; ++j) {
      const scalar_t* kr = kp + (j0 + j) * ks0 + g * ks1;
      for (int64_t d = 0; d < D; ++d) Kt[d * kBlockK + j] = static_cast<float>(kr[d]);
      const scalar_t* vr = vp + (j0 + j) * vs0 + g * vs1;
      for (int64_t e = 0; e < Dv; ++e) V[j * Dvp + e] = static_cast<float>(vr[e]);
    }
  };

  std::vector<int64_t> tile_base(s.batch + 1, 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    tile_base[b + 1] = tile_base[b] + (s.cu_k[b + 1] - s.cu_k[b] + kBlockK - 1) / kBlockK;
  }
  const int64_t total_tiles = shared_pack ? tile_base[s.batch] : 0;
  AlignedBuffer kt_all(s.kv_heads * total_tiles * D * kBlockK), v_all(s.kv_heads * total_tiles * kBlockK * Dvp);
  if (shared_pack) {
    at::parallel_for(0, s.kv_heads * total_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / total_tiles, tile = t % total_tiles;
        const int64_t b = std::upper_bound(tile_base.begin(), tile_base.end(), tile) - tile_base.begin() - 1;
        const int64_t j0 = s.cu_k[b] + (tile - tile_base[b]) * kBlockK;
        pack_tile(g, j0, std::min(kBlockK, s.cu_k[b + 1] - j0), kt_all.get() + t * D * kBlockK,
                  v_all.get() + t * kBlockK * Dvp);
      }
    });
  }

  // out = O / L and lse = M + log L for query i, head h, one rounding to the output dtype; no visible key: 0 and
  // -inf. A sink adds exp(sink) to the denominator only: with m = max(M, sink), L' = L e^(M - m) + e^(sink - m) and
  // out = O e^(M - m) / L'; a sink of +inf takes all the weight (out 0, lse +inf). A NaN anywhere in a row's logits
  // or sink leaves L NaN, and the row comes out NaN (a +inf sink included): never as "no visible key" (L == 0).
  // A +inf logit leaves M = FLT_MAX, L = +inf and O infinite or NaN: lse +inf and out NaN, a +inf sink included.
  auto finish = [&](int64_t i, int64_t h, const float* orow, float m, float l) {
    scalar_t* dst = op + i * os0 + h * os1;
    float o_scale = 1.0f;
    if (sink && sink[h] != kNegInf) {
      const float sk = sink[h];
      const float m_new = std::isnan(sk) || sk == kPosInf ? sk : std::max(m, sk);
      o_scale = l != 0.0f ? std::exp(m - m_new) : 0.0f;
      // (+inf sink: all the weight, unless the row saw a NaN, which stays NaN)
      l = m_new == kPosInf ? (std::isnan(l) ? l : 1.0f) : l * o_scale + std::exp(sk - m_new);
      m = m_new;
    }
    if (l != 0.0f) {
      const float inv = o_scale / l;
      for (int64_t e = 0; e < Dv; ++e) dst[e] = static_cast<scalar_t>(orow[e] * inv);
      lp[i * s.q_heads + h] = m + std::log(l);
    } else {
      for (int64_t e = 0; e < Dv; ++e) dst[e] = static_cast<scalar_t>(0.0f);
      lp[i * s.q_heads + h] = kNegInf;
    }
  };

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(threads, std::max<int64_t>(n_items, 1));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Rows of an item: head by head (KV head w.g + gi: rows gi * nq * G onwards), query by query, then the heads
    // of the group. S holds one KV head's rows at a time.
    const int64_t rows_max = tile_q * G * heads_per_item;
    AlignedBuffer qbuf(rows_max * D), sbuf(tile_q * G * kBlockK), obuf(rows_max * Dvp), mbuf(rows_max),
        lbuf(rows_max), alphabuf(rows_max), biasbuf(tile_q * kBlockK),
        ktbuf(local_pack ? D * kBlockK : convert ? kBlockK * heads_per_item * D : 0),
        vbuf(local_pack ? kBlockK * Dvp : convert ? kBlockK * heads_per_item * Dv : 0);
    std::vector<int64_t> tile_qpos(tile_q), key_pos(kBlockK);
    float* Q = qbuf.get();
    float* S = sbuf.get();
    float* O = obuf.get();
    float* M = mbuf.get();
    float* L = lbuf.get();
    float* alpha = alphabuf.get();
    float* bias = biasbuf.get();

    for (int64_t it = next++; it < n_items; it = next++) {
      const WorkItem& w = items[it];
      const int64_t nq = w.q_end - w.q_begin, head_rows = nq * G, rows = head_rows * heads_per_item;
      const int64_t k0 = s.cu_k[w.b];

      // Q rows (KV head w.g + gi, query r, head-in-group hh) -> row (gi * nq + r) * G + hh, in fp32 with the
      // softmax scale folded in.
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = order[w.q_begin + r];
        tile_qpos[r] = qpos[i];
        for (int64_t gi = 0; gi < heads_per_item; ++gi) {
          for (int64_t hh = 0; hh < G; ++hh) {
            const scalar_t* src = qp + i * qs0 + ((w.g + gi) * G + hh) * qs1;
            float* dst = Q + ((gi * nq + r) * G + hh) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
          }
        }
      }
      std::fill(O, O + rows * Dvp, 0.0f);
      std::fill(M, M + rows, kNegInf);
      std::fill(L, L + rows, 0.0f);
      const int64_t q_min = tile_qpos[0], q_max = tile_qpos[nq - 1];
      // Keys at positions <= q_min - window are outside every query's window.
      const int64_t win_lo = window > 0 ? window_start(q_min, window) : std::numeric_limits<int64_t>::min();

      for (int64_t j0 = w.k_begin; j0 < w.k_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, s.cu_k[w.b + 1] - j0);
        int64_t pos_min = std::numeric_limits<int64_t>::max(), pos_max = std::numeric_limits<int64_t>::min();
        bool all_present = nk == kBlockK;
        for (int64_t j = 0; j < kBlockK; ++j) {
          const int64_t p = j < nk ? (kvpos ? kvpos[j0 + j] : j0 + j - k0) : -1;
          key_pos[j] = p;
          if (p < 0) {
            all_present = false;
          } else {
            pos_min = std::min(pos_min, p);
            pos_max = std::max(pos_max, p);
          }
        }
        // No query of the tile sees any key of this tile (or none is present): past the last query, or before
        // the first query's window.
        if (pos_min > q_max || pos_max <= win_lo) continue;
        const bool whole_window = window <= 0 || pos_min > window_start(q_max, window);  // in every query's window
        const bool need_mask = !(all_present && pos_max <= q_min && whole_window);

        const float *Kt, *V;
        int64_t ldk = 0, ldv = Dvp, k_head = 0, v_head = 0;  // k_head, v_head: from one KV head's row to the next
        if (rows_path) {
          if constexpr (kFloat) {  // fp32 rows where they lie
            Kt = kp + j0 * ks0 + w.g * ks1;
            V = vp + j0 * vs0 + w.g * vs1;
            ldk = ks0, ldv = vs0, k_head = ks1, v_head = vs1;
          } else {  // the tile's rows of the item's heads in fp32, head after head within a key's row
            float* kc = ktbuf.get();
            float* vc = vbuf.get();
            for (int64_t j = 0; j < nk; ++j) {
              for (int64_t gi = 0; gi < heads_per_item; ++gi) {
                const scalar_t* kr = kp + (j0 + j) * ks0 + (w.g + gi) * ks1;
                const scalar_t* vr = vp + (j0 + j) * vs0 + (w.g + gi) * vs1;
                float* kd = kc + (j * heads_per_item + gi) * D;
                float* vd = vc + (j * heads_per_item + gi) * Dv;
                for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<float>(kr[d]);
                for (int64_t e = 0; e < Dv; ++e) vd[e] = static_cast<float>(vr[e]);
              }
            }
            Kt = kc, V = vc;
            ldk = heads_per_item * D, ldv = heads_per_item * Dv, k_head = D, v_head = Dv;
          }
          // The next tile's rows are requested now, every head's part: the rows are a stride apart (and their
          // heads too, where K/V are views), and a decode call is nothing but this stream.
          const int64_t next_nk = std::min(kBlockK, w.k_end - j0 - kBlockK);
          for (int64_t j = 0; j < next_nk; ++j) {
            for (int64_t gi = 0; gi < heads_per_item; ++gi) {
              const char* kr = reinterpret_cast<const char*>(kp + (j0 + kBlockK + j) * ks0 + (w.g + gi) * ks1);
              const char* vr = reinterpret_cast<const char*>(vp + (j0 + kBlockK + j) * vs0 + (w.g + gi) * vs1);
              for (int64_t b = 0; b < D * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(kr + b);
              for (int64_t b = 0; b < Dv * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(vr + b);
            }
          }
        } else if (local_pack) {
          pack_tile(w.g, j0, nk, ktbuf.get(), vbuf.get());
          Kt = ktbuf.get();
          V = vbuf.get();
        } else {
          const int64_t tile_id = w.g * total_tiles + tile_base[w.b] + (j0 - k0) / kBlockK;
          Kt = kt_all.get() + tile_id * D * kBlockK;
          V = v_all.get() + tile_id * kBlockK * Dvp;
        }

        // Masks per query of the tile (0: visible, -inf: not), shared by its G heads; attend_tile selects by them.
        if (need_mask) {
          for (int64_t r = 0; r < nq; ++r) {
            float* br = bias + r * kBlockK;
            for (int64_t j = 0; j < kBlockK; ++j) {
              const int64_t p = key_pos[j];
              const bool in_window = window <= 0 || p > window_start(tile_qpos[r], window);
              br[j] = (p >= 0 && p <= tile_qpos[r] && in_window) ? 0.0f : kNegInf;
            }
          }
        }
        for (int64_t gi = 0; gi < heads_per_item; ++gi) {  // heads past the first: the rows path only
          const int64_t row0 = gi * head_rows;
          attend_tile(head_rows, D, Dvp, nk, G, need_mask, softcap, Q + row0 * D, Kt + gi * k_head, ldk,
                      V + gi * v_head, ldv, bias, S, O + row0 * Dvp, M + row0, L + row0, alpha + row0);
        }
      }

      if (w.part < 0) {
        for (int64_t gi = 0; gi < heads_per_item; ++gi) {
          for (int64_t r = 0; r < nq; ++r) {
            for (int64_t hh = 0; hh < G; ++hh) {
              const int64_t row = (gi * nq + r) * G + hh;
              finish(order[w.q_begin + r], (w.g + gi) * G + hh, O + row * Dvp, M[row], L[row]);
            }
          }
        }
      } else {  // a slice: its state, merged below
        const int64_t base = w.part + w.slice * rows;
        std::memcpy(part_o.get() + base * Dvp, O, sizeof(float) * rows * Dvp);
        std::memcpy(part_m.get() + base, M, sizeof(float) * rows);
        std::memcpy(part_l.get() + base, L, sizeof(float) * rows);
      }
    }
  });
  if (part_rows == 0) return;

  // Merge the slices of each split item, in slice order: m = max M_z, L = sum L_z e^(M_z - m), O likewise. A slice
  // that saw nothing has M_z = -inf, so it adds nothing; a row no slice saw is finished as with no visible key.
  std::vector<const WorkItem*> heads;  // slice 0 of each split item
  for (const WorkItem& w : items) {
    if (w.part >= 0 && w.slice == 0) heads.push_back(&w);
  }
  at::parallel_for(0, static_cast<int64_t>(heads.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Dvp);
    for (int64_t x = begin; x < end; ++x) {
      const WorkItem& w = *heads[x];
      const int64_t nq = w.q_end - w.q_begin, rows = nq * G * heads_per_item;
      for (int64_t rg = 0; rg < nq * heads_per_item; ++rg) {  // (KV head gi, query r) as gi * nq + r
        const int64_t gi = rg / nq, r = rg % nq;
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t row = w.part + rg * G + hh;
          // A slice whose visible logits include a NaN has L = NaN (its M may still be -inf, when NaN was all it
          // saw): carried here, so the row comes out NaN and never as "no visible key".
          float m = kNegInf;
          bool nan_row = false;
          for (int64_t z = 0; z < w.slices; ++z) {
            m = std::max(m, part_m.get()[row + z * rows]);
            nan_row = nan_row || std::isnan(part_l.get()[row + z * rows]);
          }
          float l = 0.0f;
          std::fill(acc.begin(), acc.end(), 0.0f);
          if (m > kNegInf) {
            for (int64_t z = 0; z < w.slices; ++z) {
              const int64_t zr = row + z * rows;
              const float c = std::exp(part_m.get()[zr] - m);  // 0 for a slice that saw nothing
              l += part_l.get()[zr] * c;
              const float* o = part_o.get() + zr * Dvp;
              for (int64_t e = 0; e < Dv; ++e) acc[e] += o[e] * c;
            }
          }
          if (nan_row) l = std::numeric_limits<float>::quiet_NaN();
          finish(order[w.q_begin + r], (w.g + gi) * G + hh, acc.data(), m, l);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> partial_attn_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& q_pos, const std::optional<at::Tensor>& kv_pos,
                                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                                    const std::optional<at::Tensor>& cu_seqlens_k,
                                                    std::optional<double> scale, int64_t window, double softcap,
                                                    const std::optional<at::Tensor>& sinks) {
  const PartialAttnShape s =
      check_partial_attn_args(q, k, v, q_pos, kv_pos, cu_seqlens_q, cu_seqlens_k, scale, window, softcap, sinks);
  at::Tensor out = at::empty({s.nq, s.q_heads, s.v_head_dim}, q.options());
  at::Tensor lse = at::empty({s.nq, s.q_heads}, q.options().dtype(at::kFloat));
  if (s.nq == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "partial_attn_cpu", [&] {
    partial_attn_kernel<scalar_t>(s, q, k, v, q_pos, kv_pos, sinks, out, lse);
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(semshare, CPU, m) { m.impl("partial_attn", &partial_attn_cpu); }

}  // namespace semshare
