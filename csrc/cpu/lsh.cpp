// CPU kernels of the LSH family: simhash (sign-random-projection codes) and hamming_topk (nearest codes).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"

namespace semshare {

namespace {

// x's rows projected on the planes, [rows, bits] fp32. Large bf16 and fp16 inputs are widened a block of rows at a
// time into one buffer of about 4 MiB and multiplied from there: an fp32 copy of the whole x (simhash_projection,
// both devices' path) past 32 MiB, glibc's largest threshold for serving an allocation from mmap, gets fresh pages
// on every call, and faulting them in takes as long as the GEMM (4096 x 4096 bf16: 47-55 ms against 27-28 ms
// blocked, the fp32 input's time). Smaller copies reuse the heap's pages and beat the blocked GEMMs (4096 x 576:
// 3.4 ms against 4.3). The same fp32 values go through the GEMM either way.
at::Tensor projection(const at::Tensor& x, const at::Tensor& planes) {
  if (x.scalar_type() == at::kFloat || x.numel() <= (int64_t(8) << 20)) return simhash_projection(x, planes);
  const at::Tensor rows = x.reshape({-1, x.size(-1)});
  const int64_t n = rows.size(0), features = rows.size(1);
  const int64_t block = std::min(n, std::max<int64_t>(1, (int64_t(1) << 20) / features));
  at::Tensor proj = at::empty({n, planes.size(1)}, planes.options());
  at::Tensor widened = at::empty({block, features}, planes.options());
  for (int64_t r = 0; r < n; r += block) {
    const int64_t m = std::min(block, n - r);
    at::Tensor part = widened.narrow(0, 0, m);
    part.copy_(rows.narrow(0, r, m));
    at::Tensor dst = proj.narrow(0, r, m);
    at::mm_out(dst, part, planes);
  }
  return proj;
}

}  // namespace

at::Tensor simhash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  check_simhash_args(x, planes);
  const int64_t bits = planes.size(1), words = simhash_words(bits);
  // The projection is a plain fp32 GEMM: the BLAS does it at the machine's peak, and fp32 accumulation is
  // what the spec asks for. The packing below is the part no library does.
  const at::Tensor proj = projection(x, planes);
  at::Tensor out = simhash_codes_for(x, bits);
  const int64_t rows = proj.size(0);
  const float* p = proj.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(bits, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = p + r * bits;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t word = 0;
        const int64_t b0 = w * 64, b1 = std::min(bits, b0 + 64);
        for (int64_t b = b0; b < b1; ++b) word |= static_cast<uint64_t>(row[b] >= 0.0f) << (b - b0);
        o[r * words + w] = static_cast<int64_t>(word);
      }
    }
  });
  return out;
}

namespace {

// Hamming distance of two codes; W > 0 fixes the word count at compile time, so the loop unrolls (W = 0: `words`).
template <int W>
inline int32_t hamming(const uint64_t* a, const uint64_t* b, int64_t words) {
  const int64_t n = W > 0 ? W : words;
  int32_t h = 0;
  for (int64_t w = 0; w < n; ++w) h += __builtin_popcountll(a[w] ^ b[w]);
  return h;
}

// Per-thread buffers of the selection.
struct TopkScratch {
  std::vector<int64_t> count;   // [64 W + 1]: codes at each distance, then each bucket's next output slot
  std::vector<int32_t> cand_h;  // [Nk]: the codes that were within the running cut when seen, in reference order
  std::vector<int64_t> cand_j;
};

constexpr int64_t kSample = 64;  // codes in the strided sample that sets the first cut
constexpr int kBlock = 16;       // codes whose distances are computed before one test against the cut

// The k nearest of `nk` reference codes to the query `q`, ordered by (distance, reference index).
//
// Distances are small integers (0..64 W), so this is a counting sort, with a running cut so that most codes cost
// only their distance: `cut` is the k-th smallest distance seen so far (from a strided sample at first), a code
// beyond it can never be among the k nearest, and only the codes within it are counted and kept as candidates, in
// reference order. At the end, every code nearer than the final cut, and every code at it, was a candidate (the cut
// only falls), so the placement over the candidates is the counting sort's: exact, ties to the smaller index.
// The scan is scalar POPCNTs with one test against the cut per block of codes: about 0.75 ns a pair on one core of
// this AMD EPYC, about its distance computation alone (AVX2 has no vector popcount; a nibble-lookup one was not tried).
template <int W>
void nearest_codes(const uint64_t* q, const uint64_t* kp, int64_t nk, int64_t words, int64_t k, TopkScratch& s,
                   int32_t* drow, int64_t* irow) {
  const int64_t max_dist = 64 * words;
  int64_t* count = s.count.data();
  int64_t cut = max_dist;
  if (nk >= 4 * kSample && k <= kSample / 4) {  // a sample worth its cost, whose k-th nearest is a useful bound
    // Without a first guess, codes growing nearer along the row would all pass the cut (1.3x slower than the plain
    // counting sort); a sample spread over the row bounds the cut from the start.
    std::fill(count, count + max_dist + 1, 0);
    const int64_t stride = nk / kSample;
    for (int64_t i = 0; i < kSample; ++i) ++count[hamming<W>(q, kp + i * stride * words, words)];
    int64_t below = 0;
    cut = 0;
    while (below + count[cut] < k) below += count[cut++];
  }
  std::fill(count, count + max_dist + 1, 0);
  int64_t within = 0, candidates = 0;  // codes seen within the cut (recounted from here, the sample included)
  int32_t* cand_h = s.cand_h.data();
  int64_t* cand_j = s.cand_j.data();
  const auto see = [&](int32_t h, int64_t j) {
    if (h > cut) return;
    cand_h[candidates] = h;
    cand_j[candidates++] = j;
    ++count[h];
    ++within;
    while (within - count[cut] >= k) within -= count[cut--];  // k codes are nearer than the cut: lower it
  };
  int64_t j = 0;
  for (; j + kBlock <= nk; j += kBlock) {
    int32_t h[kBlock];
    for (int b = 0; b < kBlock; ++b) h[b] = hamming<W>(q, kp + (j + b) * words, words);
    int32_t nearest = h[0];
    for (int b = 1; b < kBlock; ++b) nearest = std::min(nearest, h[b]);
    if (nearest > cut) continue;
    for (int b = 0; b < kBlock; ++b) see(h[b], j + b);
  }
  for (; j < nk; ++j) see(hamming<W>(q, kp + j * words, words), j);

  // Every code nearer than `cut` is taken, and the first `take_at_cut` codes at `cut`.
  const int64_t take_at_cut = k - (within - count[cut]);
  // Start offset of each distance bucket in the output row (exclusive prefix sums up to the cut).
  int64_t offset = 0;
  for (int64_t h = 0; h <= cut; ++h) {
    const int64_t c = count[h];
    count[h] = offset;
    offset += c;
  }
  int64_t taken_at_cut = 0;
  for (int64_t m = 0; m < candidates; ++m) {
    const int32_t h = cand_h[m];
    if (h > cut || (h == cut && taken_at_cut == take_at_cut)) continue;
    if (h == cut) ++taken_at_cut;
    const int64_t slot = count[h]++;
    drow[slot] = h;
    irow[slot] = cand_j[m];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& q_codes, const at::Tensor& k_codes, int64_t k) {
  check_hamming_topk_args(q_codes, k_codes, k);
  const int64_t nq = q_codes.size(0), nk = k_codes.size(0), words = q_codes.size(1);
  at::Tensor dist = at::empty({nq, k}, q_codes.options().dtype(at::kInt));
  at::Tensor idx = at::empty({nq, k}, q_codes.options());
  const at::Tensor kc = k_codes.contiguous();
  const uint64_t* kp = reinterpret_cast<const uint64_t*>(kc.data_ptr<int64_t>());
  const int64_t* qp = q_codes.data_ptr<int64_t>();
  const int64_t q_stride = q_codes.stride(0);
  int32_t* dp = dist.data_ptr<int32_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  // One specialisation per common code width (64, 128 and 256 bits), a run-time word count otherwise.
  const auto select = words == 1 ? &nearest_codes<1> : words == 2 ? &nearest_codes<2>
                    : words == 4 ? &nearest_codes<4> : &nearest_codes<0>;

  at::parallel_for(0, nq, std::max<int64_t>(1, 65536 / std::max<int64_t>(nk * words, 1)), [&](int64_t begin, int64_t end) {
    TopkScratch scratch{std::vector<int64_t>(64 * words + 1), std::vector<int32_t>(nk), std::vector<int64_t>(nk)};
    for (int64_t i = begin; i < end; ++i) {
      select(reinterpret_cast<const uint64_t*>(qp + i * q_stride), kp, nk, words, k, scratch, dp + i * k, ip + i * k);
    }
  });
  return {dist, idx};
}

TORCH_LIBRARY_IMPL(semshare, CPU, m) {
  m.impl("simhash", &simhash_cpu);
  m.impl("hamming_topk", &hamming_topk_cpu);
}

}  // namespace semshare
