// SIMT emulator stand-in for csrc/cuda/ptx.cuh (python_tests/simt_emu): the same functions, implemented from the
// PTX ISA's definitions. mma.m16n8k16 is a warp collective: every lane deposits its fragments, the warp meets,
// and each lane computes its own accumulators from the operands it gathers, by the PTX fragment tables.
#pragma once

#include "simt_emu.h"

namespace semshare {

namespace ptx_emu {
template <bool kBf16>
inline float half_to_float(uint16_t h) {
  if constexpr (kBf16) {
    return c10::BFloat16(h, c10::BFloat16::from_bits());
  } else {
    return c10::Half(h, c10::Half::from_bits());
  }
}
// Element i (0 = low half) of a 32-bit register holding two 16-bit values.
inline uint16_t half_of(uint32_t reg, int i) { return static_cast<uint16_t>(reg >> (16 * i)); }
}  // namespace ptx_emu

template <bool kBf16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Fragments {
    uint32_t a[4], b[2];
  };
  const Fragments mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const auto* s = simt::exchange(mine, kBf16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16");
  // A (16 x 16, row major) element (r, c) sits in lane 4 * (r % 8) + (c % 8) / 2, register (r >= 8) + 2 * (c >= 8),
  // half c % 2. B (16 x 8, column major) element (k, n) in lane 4 * n + (k % 8) / 2, register k >= 8, half k % 2.
  // This lane's accumulators: rows grp and grp + 8, columns 2 * tig and 2 * tig + 1.
  const int lane = simt::self().lane, grp = lane / 4, tig = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = grp + 8 * (e / 2), n = 2 * tig + (e % 2);
    double acc = d[e];
    for (int c = 0; c < 16; ++c) {
      const Fragments fa = simt::slot_as<Fragments>(s, 4 * (r % 8) + (c % 8) / 2);
      const Fragments fb = simt::slot_as<Fragments>(s, 4 * n + (c % 8) / 2);
      const float x = ptx_emu::half_to_float<kBf16>(ptx_emu::half_of(fa.a[(r >= 8) + 2 * (c >= 8)], c % 2));
      const float y = ptx_emu::half_to_float<kBf16>(ptx_emu::half_of(fb.b[c >= 8], c % 2));
      acc += static_cast<double>(x) * y;
    }
    out[e] = static_cast<float>(acc);
  }
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.m8n8.x4(.trans).b16: lane i gives the address of row i % 8 of matrix i / 8 (16 bytes, aligned); lane l
// receives, for each matrix, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (transposed: column l / 4 of rows
// 2 (l % 4) and 2 (l % 4) + 1).
template <bool kTrans>
inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16) simt::fail("ldmatrix: a row address not 16-byte aligned");
  const auto* s = simt::exchange(row, kTrans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  const int lane = simt::self().lane;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if constexpr (kTrans) {
      lo = static_cast<const uint16_t*>(simt::slot_as<const void*>(s, 8 * i + 2 * (lane % 4)))[lane / 4];
      hi = static_cast<const uint16_t*>(simt::slot_as<const void*>(s, 8 * i + 2 * (lane % 4) + 1))[lane / 4];
    } else {
      const auto* src = static_cast<const uint16_t*>(simt::slot_as<const void*>(s, 8 * i + lane / 4));
      lo = src[2 * (lane % 4)];
      hi = src[2 * (lane % 4) + 1];
    }
    r[i] = lo | (static_cast<uint32_t>(hi) << 16);
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_x4_impl<false>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_x4_impl<true>(r, row); }

// cp.async.cg 16 bytes (zero-filled when !valid), commit_group, wait_group: the runtime's deferred copies.
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (valid && reinterpret_cast<uintptr_t>(gmem) % 16)) {
    simt::fail("cp.async: an address not 16-byte aligned");
  }
  simt::async_copy(smem, gmem, 16, valid);
}
inline void cp_async_commit() { simt::async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  simt::async_wait(kPending);
}

inline ulonglong2 load16(const void* ptr) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) simt::fail("ld.global.v2.u64 from an address not 16-byte aligned");
  ulonglong2 x;
  std::memcpy(&x, ptr, 16);
  return x;
}

inline void store16(void* ptr, ulonglong2 x) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) simt::fail("st.global.v2.u64 to an address not 16-byte aligned");
  std::memcpy(ptr, &x, 16);
}

}  // namespace semshare
