// A token-major cache ([T, H, D] or [L, T, H, D], any strides but the last) as the rope_reuse_ kernels address it:
// its base pointer and its layer, token and head strides. Built on the host; the CUDA kernels take it by value.
#pragma once

#include <ATen/ATen.h>

namespace semshare {

struct CacheView {
  char* base;
  int64_t layer, token, head;  // strides in elements; layer stride 0 for 3-D caches
};

inline CacheView view_of(const at::Tensor& t) {
  return {static_cast<char*>(t.data_ptr()), t.dim() == 4 ? t.stride(0) : 0, t.stride(-3), t.stride(-2)};
}

}  // namespace semshare
