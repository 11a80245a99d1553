// The SIMT emulator's one out-of-line piece: the handler that -fsanitize=alignment calls on a misaligned typed
// access (a uint4 or uint32_t load through a reinterpret_cast, say), which on a GPU is a misaligned-address fault.
// Defined here instead of linking libubsan, so that the fault fails the kernel's launch like any emulator error.
#include "simt_emu.h"

namespace {
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeMismatchData {  // UBSan's ABI (compiler-rt ubsan_handlers.h)
  SourceLocation loc;
  const void* type;
  unsigned char log_alignment, type_check_kind;
};

[[noreturn]] void misaligned(TypeMismatchData* data, uintptr_t pointer) {
  const std::string what = "misaligned access: address " + std::to_string(pointer) + " is not " +
                           std::to_string(1u << data->log_alignment) + "-byte aligned, at " + data->loc.file + ":" +
                           std::to_string(data->loc.line);
  if (simt::t_fiber != nullptr) simt::fail(what);
  TORCH_CHECK(false, "SIMT emulator: ", what);
}
}  // namespace

extern "C" {
void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, uintptr_t pointer) { misaligned(data, pointer); }
void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, uintptr_t pointer) { misaligned(data, pointer); }
}
