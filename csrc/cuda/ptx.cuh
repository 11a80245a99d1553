// The inline PTX the kernels use, in one place: tensor-core MMA and 16-byte global loads/stores. Everything else
// in csrc/cuda is plain CUDA C++. (python_tests/simt_emu runs the kernels on the CPU with its own ptx.cuh, which
// implements these same functions from PTX's fragment tables.)
#pragma once

#include <cstdint>

namespace semshare {

// D += A B for one warp: A 16x16 (row), B 16x8 (col), fp16 or bf16 inputs, fp32 accumulators, in PTX's
// mma.m16n8k16 fragment layout (lane = 4 * group + thread_in_group).
template <bool kBf16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 16-byte global accesses written out: plain C++ stores of a 16-byte value came out as 4- and 8-byte stores.
__device__ __forceinline__ ulonglong2 load16(const void* ptr) {
  ulonglong2 x;
  asm volatile("ld.global.v2.u64 {%0, %1}, [%2];\n" : "=l"(x.x), "=l"(x.y) : "l"(ptr));
  return x;
}

__device__ __forceinline__ void store16(void* ptr, ulonglong2 x) {
  asm volatile("st.global.v2.u64 [%0], {%1, %2};\n" ::"l"(ptr), "l"(x.x), "l"(x.y) : "memory");
}

}  // namespace semshare
