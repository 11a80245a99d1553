// The inline PTX the kernels use, in one place: tensor-core MMA, ldmatrix, cp.async and 16-byte global
// loads/stores. Everything else in csrc/cuda is plain CUDA C++. (python_tests/simt_emu runs the kernels on the CPU
// with its own ptx.cuh, which implements these same functions from the PTX ISA's definitions.)
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

// Four 8x8 matrices of 16-bit elements from shared memory, in mma fragment layout: lane i gives the address of
// row i % 8 of matrix i / 8 (16-byte aligned); register j of lane l holds row l / 4, elements 2 (l % 4) and
// 2 (l % 4) + 1 of matrix j. The .trans form delivers each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes global -> shared without passing through registers (cached in L2 only, .cg); !valid writes 16 zeros
// and reads nothing. The copies of a thread form groups (commit); wait<N> returns once at most N of its newest
// groups are in flight. Other threads see the bytes only after a barrier that follows the wait.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
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
