// Argument checks shared by the CPU and CUDA kernels. Every check runs before the first write, so a rejected
// call leaves in-place outputs untouched, and every message names the argument it is about (docs/contract.md section 3).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

namespace semshare {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_activation_dtype(t.scalar_type()), name, ": expected float32, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              ": the last dimension must be contiguous (stride 1), got strides ", t.strides());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ": expected size ", expected, " at dim ", dim, " (", what, "), got ",
              t.sizes());
}

// True when the byte ranges the two tensors span intersect. Coarser than an element-exact test (two interleaved
// views of one buffer count as sharing), but exact for the common case of separate caches, where ATen's
// get_overlap_status gives up on non-dense views (a cache prefix, a transposed HF cache). Addresses, not Storage
// identity: two Storages can wrap the same memory (torch.from_numpy or DLPack twice over one buffer), and ranges
// of separate allocations on one device never intersect.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* lo = static_cast<const char*>(t.data_ptr());
    return std::pair{lo, lo + (last + 1) * t.element_size()};
  };
  const auto [a_lo, a_hi] = span(a);
  const auto [b_lo, b_hi] = span(b);
  return a_lo < b_hi && b_lo < a_hi;
}

// Whether an output's elements each have an address of their own. ATen's has_internal_overlap decides only
// stride 0 (Yes) and dense layouts (No); any other view (a cache prefix, a transposed HF cache, an as_strided view
// whose rows overlap) is TOO_HARD, and a kernel writing such a view would silently overwrite one row with another.
// Decided here instead: with the dimensions sorted by stride, the layout is overlap-free when every stride exceeds
// the span of the smaller-strided dimensions (true of any slice, transpose or permutation of a dense tensor); a
// layout whose dimensions interleave is decided by listing its offsets, up to kOffsetsListed elements, and beyond
// that is not decided (Yes / No / TooHard, as ATen's MemOverlap).
enum class Overlap { No, Yes, TooHard };
constexpr int64_t kOffsetsListed = int64_t{1} << 20;

inline Overlap internal_overlap(const at::Tensor& t) {
  if (t.numel() <= 1) return Overlap::No;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) == 0) return Overlap::Yes;
    dims.emplace_back(std::abs(t.stride(d)), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset the smaller-strided dimensions reach
  bool nested = true;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) {
      nested = false;
      break;
    }
    span += stride * (size - 1);
  }
  if (nested) return Overlap::No;
  if (t.numel() > kOffsetsListed) return Overlap::TooHard;
  std::vector<int64_t> offsets{0};
  offsets.reserve(t.numel());
  for (const auto& [stride, size] : dims) {
    const size_t n = offsets.size();
    for (int64_t i = 1; i < size; ++i) {
      for (size_t j = 0; j < n; ++j) offsets.push_back(offsets[j] + i * stride);
    }
  }
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end() ? Overlap::Yes : Overlap::No;
}

inline void check_one_address_per_element(const at::Tensor& t, const char* name) {
  const Overlap overlap = internal_overlap(t);
  TORCH_CHECK(overlap != Overlap::Yes, name,
              ": some of its elements share memory (an expanded view?); an output needs one address per element, ",
              "got strides ", t.strides(), " for shape ", t.sizes());
  TORCH_CHECK(overlap != Overlap::TooHard, name, ": its dimensions interleave in memory (strides ", t.strides(),
              " for shape ", t.sizes(), "), and whether two of its ", t.numel(), " elements share an address is ",
              "only checked up to ", kOffsetsListed, " elements; an output needs one address per element: pass a ",
              "view whose strides nest (each larger than the span of the smaller ones), such as a contiguous tensor");
}

// For the CUDA kernels' vector paths: the data pointer is aligned to `elems` elements and every stride but the last
// is a multiple of `elems`, so each row (and each `elems`-element chunk of it) starts on that alignment.
inline bool rows_aligned(const at::Tensor& t, int64_t elems) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (elems * static_cast<int64_t>(t.element_size())) != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % elems != 0) return false;
  }
  return true;
}

// ---- simhash -------------------------------------------------------------------------------------------------

inline void check_simhash_args(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a scalar");
  TORCH_CHECK(x.size(-1) > 0, "x: expected at least one feature in the last dimension, got shape ", x.sizes());
  check_activation(x, "x");
  check_dim(planes, 2, "planes");
  check_dtype(planes, at::kFloat, "planes");
  check_same_device(planes, x, "planes", "x");
  TORCH_CHECK(planes.size(0) == x.size(-1), "planes: expected ", x.size(-1), " rows (the last dim of x), got shape ",
              planes.sizes());
}

inline int64_t simhash_words(int64_t bits) { return (bits + 63) / 64; }

// The empty int64 codes [..., W] of x's rows.
inline at::Tensor simhash_codes_for(const at::Tensor& x, int64_t bits) {
  auto shape = x.sizes().vec();
  shape.back() = simhash_words(bits);
  return at::empty(shape, x.options().dtype(at::kLong));
}

// The projection both devices start from, as [rows, B] fp32 through the BLAS (cuBLAS on CUDA, which torch keeps
// out of TF32 for fp32 unless the user allows it); its signs are packed into simhash_codes_for(x, B).
inline at::Tensor simhash_projection(const at::Tensor& x, const at::Tensor& planes) {
  return at::matmul(x.reshape({-1, x.size(-1)}).to(at::kFloat), planes).contiguous();
}

// ---- hamming_topk ----------------------------------------------------------------------------------------------

// Words per code hamming_topk takes, on every device: the CUDA kernel keeps a query's code and its distance
// histogram (64 * words + 1 bins) per warp in shared memory, and one limit for both devices keeps them agreeing on
// what is legal. 1024 bits is far past what LSH matching needs (ReuseConfig.lsh_bits allows as much).
constexpr int64_t kMaxCodeWords = 16;

inline void check_hamming_topk_args(const at::Tensor& q_codes, const at::Tensor& k_codes, int64_t k) {
  check_dim(q_codes, 2, "q_codes");
  check_dim(k_codes, 2, "k_codes");
  check_dtype(q_codes, at::kLong, "q_codes");
  check_dtype(k_codes, at::kLong, "k_codes");
  check_same_device(k_codes, q_codes, "k_codes", "q_codes");
  TORCH_CHECK(k_codes.size(1) == q_codes.size(1), "k_codes: expected ", q_codes.size(1),
              " words per code (as q_codes), got shape ", k_codes.sizes());
  TORCH_CHECK(q_codes.size(1) >= 1 && q_codes.size(1) <= kMaxCodeWords, "q_codes: expected 1 to ", kMaxCodeWords,
              " words per code (up to ", 64 * kMaxCodeWords, " bits), got shape ", q_codes.sizes());
  TORCH_CHECK(q_codes.size(1) <= 1 || q_codes.stride(1) == 1, "q_codes: the last dimension must be contiguous");
  TORCH_CHECK(k_codes.size(1) <= 1 || k_codes.stride(1) == 1, "k_codes: the last dimension must be contiguous");
  TORCH_CHECK_VALUE(k >= 1 && k <= k_codes.size(0), "k: expected 1 <= k <= ", k_codes.size(0),
                    " (the number of reference codes), got ", k);
}

// ---- rope_reuse_ -----------------------------------------------------------------------------------------------

// Shapes of a rope_reuse_ call, with the token-major caches seen as [L, T, H, D] (L = 1 for 3-D caches).
struct RopeReuseShape {
  int64_t layers, t_dst, t_src, heads, head_dim, v_head_dim, pairs, half_rotary;
};

inline RopeReuseShape check_rope_reuse_args(const at::Tensor& k_dst, const at::Tensor& v_dst,
                                            const at::Tensor& k_src, const at::Tensor& v_src,
                                            const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                            const at::Tensor& delta, const at::Tensor& inv_freq,
                                            bool check_index_values = true) {
  const int64_t nd = k_dst.dim();
  TORCH_CHECK(nd == 3 || nd == 4, "k_dst: expected [T, H, D] or [L, T, H, D], got shape ", k_dst.sizes());
  check_dim(v_dst, nd, "v_dst");
  check_dim(k_src, nd, "k_src");
  check_dim(v_src, nd, "v_src");
  check_activation(k_dst, "k_dst");
  for (auto [t, name] : {std::pair{&v_dst, "v_dst"}, {&k_src, "k_src"}, {&v_src, "v_src"}}) {
    check_activation(*t, name);
    TORCH_CHECK(t->scalar_type() == k_dst.scalar_type(), name, ": expected dtype ", k_dst.scalar_type(),
                " (as k_dst), got ", t->scalar_type());
    check_same_device(*t, k_dst, name, "k_dst");
  }
  const int64_t o = nd - 3;  // offset of the token dim
  RopeReuseShape s{};
  s.layers = nd == 4 ? k_dst.size(0) : 1;
  s.t_dst = k_dst.size(o);
  s.t_src = k_src.size(o);
  s.heads = k_dst.size(o + 1);
  s.head_dim = k_dst.size(o + 2);
  s.v_head_dim = v_dst.size(o + 2);
  if (nd == 4) {
    check_size(v_dst, 0, s.layers, "v_dst", "layers, as k_dst");
    check_size(k_src, 0, s.layers, "k_src", "layers, as k_dst");
    check_size(v_src, 0, s.layers, "v_src", "layers, as k_dst");
  }
  check_size(v_dst, o, s.t_dst, "v_dst", "tokens, as k_dst");
  check_size(v_src, o, s.t_src, "v_src", "tokens, as k_src");
  check_size(v_dst, o + 1, s.heads, "v_dst", "heads, as k_dst");
  check_size(k_src, o + 1, s.heads, "k_src", "heads, as k_dst");
  check_size(v_src, o + 1, s.heads, "v_src", "heads, as k_dst");
  check_size(k_src, o + 2, s.head_dim, "k_src", "head dim, as k_dst");
  check_size(v_src, o + 2, s.v_head_dim, "v_src", "head dim, as v_dst");

  check_dim(src_idx, 1, "src_idx");
  check_dim(dst_idx, 1, "dst_idx");
  check_dim(delta, 1, "delta");
  check_dtype(src_idx, at::kLong, "src_idx");
  check_dtype(dst_idx, at::kLong, "dst_idx");
  check_dtype(delta, at::kLong, "delta");
  s.pairs = src_idx.size(0);
  check_size(dst_idx, 0, s.pairs, "dst_idx", "pairs, as src_idx");
  check_size(delta, 0, s.pairs, "delta", "pairs, as src_idx");
  check_dim(inv_freq, 1, "inv_freq");
  check_dtype(inv_freq, at::kFloat, "inv_freq");
  s.half_rotary = inv_freq.size(0);
  TORCH_CHECK(2 * s.half_rotary <= s.head_dim, "inv_freq: rotary_dim = 2 * len(inv_freq) = ", 2 * s.half_rotary,
              " exceeds the key head dim ", s.head_dim);
  for (auto [t, name] : {std::pair{&src_idx, "src_idx"}, {&dst_idx, "dst_idx"}, {&delta, "delta"},
                         {&inv_freq, "inv_freq"}}) {
    check_same_device(*t, k_dst, name, "k_dst");
  }

  // Outputs must not share memory with each other or with the sources: the kernels read and write in one pass.
  check_one_address_per_element(k_dst, "k_dst");
  check_one_address_per_element(v_dst, "v_dst");
  auto no_overlap = [](const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
    TORCH_CHECK(!may_share_memory(a, b), an, ": must not share memory with ", bn);
  };
  no_overlap(k_dst, v_dst, "k_dst", "v_dst");
  no_overlap(k_dst, k_src, "k_dst", "k_src");
  no_overlap(k_dst, v_src, "k_dst", "v_src");
  no_overlap(v_dst, k_src, "v_dst", "k_src");
  no_overlap(v_dst, v_src, "v_dst", "v_src");
  // Nor with the small inputs: an index the kernel's own writes change after it was checked is an out-of-bounds
  // write, and an inv_freq it overwrites rotates later pairs wrongly.
  for (auto [t, name] : {std::pair{&src_idx, "src_idx"}, {&dst_idx, "dst_idx"}, {&delta, "delta"},
                         {&inv_freq, "inv_freq"}}) {
    no_overlap(*t, k_dst, name, "k_dst");
    no_overlap(*t, v_dst, name, "v_dst");
  }

  // Index values. Device-agnostic tensor ops: host syncs on CUDA. A CUDA stream being captured into a graph
  // cannot sync, so the CUDA caller skips these there; its kernels skip out-of-range pairs instead (memory-safe,
  // but without the error).
  if (check_index_values && s.pairs > 0) {
    TORCH_CHECK_VALUE(src_idx.max().item<int64_t>() < s.t_src, "src_idx: entries must be < ", s.t_src,
                      " (tokens of k_src); negative entries skip a pair");
    TORCH_CHECK_VALUE(dst_idx.max().item<int64_t>() < s.t_dst, "dst_idx: entries must be < ", s.t_dst,
                      " (tokens of k_dst); negative entries skip a pair");
    at::Tensor named = std::get<0>(at::sort(dst_idx.masked_select(dst_idx >= 0)));
    if (named.numel() > 1) {
      TORCH_CHECK_VALUE(!at::any(named.slice(0, 1).eq(named.slice(0, 0, -1))).item<bool>(),
                        "dst_idx: non-negative entries must be unique");
    }
  }
  return s;
}

// ---- partial_attn ----------------------------------------------------------------------------------------------

// q_pos - window without int64 overflow (window > 0): positions may be any int64, and a query whose window start
// would lie below INT64_MIN sees every non-negative key its position allows.
inline int64_t window_start(int64_t q_pos, int64_t window) {
  return q_pos < std::numeric_limits<int64_t>::min() + window ? std::numeric_limits<int64_t>::min() : q_pos - window;
}

struct PartialAttnShape {
  int64_t nq, nk, q_heads, kv_heads, head_dim, v_head_dim, batch;
  double scale;
  int64_t window;  // > 0: key j is visible to query i only if q_pos[i] - window < kv_pos[j]; -1: no window
  double softcap;  // > 0: logits become softcap * tanh(logit / softcap); 0: off
  std::vector<int64_t> cu_q, cu_k;  // host copies of the sequence boundaries, [batch + 1]
};

inline std::vector<int64_t> checked_cu_seqlens(const at::Tensor& cu, int64_t total, const char* name,
                                               const at::Tensor& q) {
  check_dim(cu, 1, name);
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, name, ": expected int32 or int64, got ",
              cu.scalar_type());
  check_same_device(cu, q, name, "q");
  TORCH_CHECK(cu.size(0) >= 2, name, ": expected [B + 1] boundaries with B >= 1, got shape ", cu.sizes());
  at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + host.numel());
  TORCH_CHECK_VALUE(v.front() == 0, name, ": must start at 0, got ", v.front());
  TORCH_CHECK_VALUE(v.back() == total, name, ": must end at ", total, ", got ", v.back());
  for (size_t i = 1; i < v.size(); ++i) {
    TORCH_CHECK_VALUE(v[i] >= v[i - 1], name, ": must be non-decreasing, got ", v[i - 1], " then ", v[i]);
  }
  return v;
}

inline PartialAttnShape check_partial_attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& q_pos, const std::optional<at::Tensor>& kv_pos,
                                                const std::optional<at::Tensor>& cu_seqlens_q,
                                                const std::optional<at::Tensor>& cu_seqlens_k,
                                                std::optional<double> scale, int64_t window, double softcap,
                                                const std::optional<at::Tensor>& sinks) {
  check_dim(q, 3, "q");
  check_dim(k, 3, "k");
  check_dim(v, 3, "v");
  check_activation(q, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}}) {
    check_activation(*t, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " (as q), got ",
                t->scalar_type());
    check_same_device(*t, q, name, "q");
  }
  PartialAttnShape s{};
  s.nq = q.size(0);
  s.q_heads = q.size(1);
  s.head_dim = q.size(2);
  s.nk = k.size(0);
  s.kv_heads = k.size(1);
  s.v_head_dim = v.size(2);
  TORCH_CHECK(s.head_dim > 0, "q: head dim must be positive");
  TORCH_CHECK(s.q_heads > 0, "q: expected at least one query head, got shape ", q.sizes());
  check_size(k, 2, s.head_dim, "k", "head dim, as q");
  check_size(v, 0, s.nk, "v", "keys, as k");
  check_size(v, 1, s.kv_heads, "v", "kv heads, as k");
  TORCH_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, "k: kv heads (", s.kv_heads,
              ") must divide the query heads of q (", s.q_heads, ")");
  check_dim(q_pos, 1, "q_pos");
  check_dtype(q_pos, at::kLong, "q_pos");
  check_same_device(q_pos, q, "q_pos", "q");
  check_size(q_pos, 0, s.nq, "q_pos", "queries, as q");
  if (kv_pos.has_value()) {
    check_dim(*kv_pos, 1, "kv_pos");
    check_dtype(*kv_pos, at::kLong, "kv_pos");
    check_same_device(*kv_pos, q, "kv_pos", "q");
    check_size(*kv_pos, 0, s.nk, "kv_pos", "keys, as k");
  }
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              cu_seqlens_q.has_value() ? "cu_seqlens_k" : "cu_seqlens_q",
              ": cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    s.cu_q = checked_cu_seqlens(*cu_seqlens_q, s.nq, "cu_seqlens_q", q);
    s.cu_k = checked_cu_seqlens(*cu_seqlens_k, s.nk, "cu_seqlens_k", q);
    TORCH_CHECK(s.cu_q.size() == s.cu_k.size(), "cu_seqlens_k: expected ", s.cu_q.size(),
                " entries (as cu_seqlens_q), got ", s.cu_k.size());
  } else {
    s.cu_q = {0, s.nq};
    s.cu_k = {0, s.nk};
  }
  s.batch = static_cast<int64_t>(s.cu_q.size()) - 1;
  // Both are used in fp32 (as are the logits): a double that rounds to 0 or inf there is refused, not run as
  // "no cap" or "every logit infinite".
  const auto fp32_positive = [](double x) {
    const float f = static_cast<float>(x);
    return std::isfinite(x) && x > 0.0 && std::isfinite(f) && f > 0.0f;
  };
  TORCH_CHECK_VALUE(!scale.has_value() || fp32_positive(*scale),
                    "scale: expected a positive number within fp32's range, or None, got ", scale.value_or(0.0));
  s.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  TORCH_CHECK_VALUE(window == -1 || window > 0, "window: expected -1 (no sliding window) or a positive number of ",
                    "positions, got ", window);
  s.window = window;
  TORCH_CHECK_VALUE(softcap == 0.0 || fp32_positive(softcap),
                    "softcap: expected 0 (off) or a positive cap within fp32's range, got ", softcap);
  s.softcap = softcap;
  if (sinks.has_value()) {
    check_dim(*sinks, 1, "sinks");
    check_dtype(*sinks, at::kFloat, "sinks");
    check_same_device(*sinks, q, "sinks", "q");
    check_size(*sinks, 0, s.q_heads, "sinks", "query heads, as q");
  }
  return s;
}

}  // namespace semshare
