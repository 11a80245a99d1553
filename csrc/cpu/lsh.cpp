// CPU kernels of the LSH family: simhash (sign-random-projection codes) and hamming_topk (nearest codes).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"

namespace semshare {

at::Tensor simhash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  check_simhash_args(x, planes);
  const int64_t bits = planes.size(1), words = simhash_words(bits);
  // The projection is a plain fp32 GEMM: the BLAS does it at the machine's peak, and fp32 accumulation is
  // what the spec asks for. The packing below is the part no library does.
  const auto [proj, out] = simhash_projection(x, planes);
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

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& q_codes, const at::Tensor& k_codes, int64_t k) {
  check_hamming_topk_args(q_codes, k_codes, k);
  const int64_t nq = q_codes.size(0), nk = k_codes.size(0), words = q_codes.size(1);
  at::Tensor dist = at::empty({nq, k}, q_codes.options().dtype(at::kInt));
  at::Tensor idx = at::empty({nq, k}, q_codes.options());
  const at::Tensor kc = k_codes.contiguous();
  const uint64_t* kp = reinterpret_cast<const uint64_t*>(kc.data_ptr<int64_t>());
  const int64_t* qp = q_codes.data_ptr<int64_t>();
  const int64_t q_stride = q_codes.stride(0);
  const int64_t max_dist = 64 * words;
  int32_t* dp = dist.data_ptr<int32_t>();
  int64_t* ip = idx.data_ptr<int64_t>();

  // Distances are small integers, so the selection is a counting sort: one pass for the histogram, one to place
  // the winners. It is exact (ties go to the smaller reference index) and O(Nk + 64 W) per query, with no heap.
  at::parallel_for(0, nq, std::max<int64_t>(1, 65536 / std::max<int64_t>(nk * words, 1)), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> d(nk);
    std::vector<int64_t> count(max_dist + 1);
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t* q = reinterpret_cast<const uint64_t*>(qp + i * q_stride);
      std::fill(count.begin(), count.end(), 0);
      for (int64_t j = 0; j < nk; ++j) {
        const uint64_t* c = kp + j * words;
        int32_t h = 0;
        for (int64_t w = 0; w < words; ++w) h += __builtin_popcountll(q[w] ^ c[w]);
        d[j] = h;
        ++count[h];
      }
      // Cut-off distance: every code nearer than `cut` is taken, and the first `take_at_cut` codes at `cut`.
      int64_t cut = 0, below = 0;
      while (below + count[cut] < k) below += count[cut++];
      const int64_t take_at_cut = k - below;
      // Start offset of each distance bucket in the output row (exclusive prefix sums up to the cut).
      int64_t offset = 0;
      for (int64_t h = 0; h <= cut; ++h) {
        const int64_t c = count[h];
        count[h] = offset;
        offset += c;
      }
      int32_t* drow = dp + i * k;
      int64_t* irow = ip + i * k;
      int64_t taken_at_cut = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const int32_t h = d[j];
        if (h > cut || (h == cut && taken_at_cut == take_at_cut)) continue;
        if (h == cut) ++taken_at_cut;
        const int64_t slot = count[h]++;
        drow[slot] = h;
        irow[slot] = j;
      }
    }
  });
  return {dist, idx};
}

TORCH_LIBRARY_IMPL(semshare, CPU, m) {
  m.impl("simhash", &simhash_cpu);
  m.impl("hamming_topk", &hamming_topk_cpu);
}

}  // namespace semshare
