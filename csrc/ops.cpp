// Op schemas of the `semshare` namespace (docs/contract.md section 3). Kernels register themselves per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu, the autograd-facing ones below; fake (meta) kernels are registered
// from Python in semshare_ops/ops/__init__.py.
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

TORCH_LIBRARY(semshare, m) {
  m.def("simhash(Tensor x, Tensor planes) -> Tensor");
  m.def("hamming_topk(Tensor q_codes, Tensor k_codes, int k) -> (Tensor dist, Tensor idx)");
  m.def(
      "rope_reuse_(Tensor(a!) k_dst, Tensor(b!) v_dst, Tensor k_src, Tensor v_src, Tensor src_idx, "
      "Tensor dst_idx, Tensor delta, Tensor inv_freq, bool neox=True) -> ()");
  m.def(
      "partial_attn(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor? kv_pos=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, float? scale=None, int window=-1, float softcap=0.0, "
      "Tensor? sinks=None) -> (Tensor out, Tensor lse)");
}

// No op has a derivative. partial_attn's and rope_reuse_'s outputs are floating point, so autograd would otherwise
// let a call on tensors that require grad through with no gradient flowing back (torch's fallback only warns): under
// grad mode, a tensor of the call that requires grad is refused by name instead. rope_reuse_ writes k_dst and v_dst
// in place: every call also bumps their version counters, as torch's own in-place ops do, so a graph that saved one
// of them before the write fails at backward instead of differentiating through the new values. Inference tensors
// skip both keys, as with torch's ops. (simhash and hamming_topk return integers, which never require grad.)
namespace {

// The call's arguments on a boxed stack, first one at index 0; named and counted by the op's schema.
const c10::IValue& argument(const c10::OperatorHandle& op, const torch::jit::Stack* stack, size_t i) {
  return (*stack)[stack->size() - op.schema().arguments().size() + i];
}

void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& arguments = op.schema().arguments();
    const std::string& name = op.schema().name();  // "semshare::<op>"
    for (size_t i = 0; i < arguments.size(); ++i) {  // every tensor: an absent optional one is None
      const c10::IValue& arg = argument(op, stack, i);
      TORCH_CHECK(!(arg.isTensor() && arg.toTensor().requires_grad()), name.substr(name.rfind(':') + 1), ": ",
                  arguments[i].name(),
                  " requires grad, but the op has no derivative; call it under torch.no_grad() or on detached tensors");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

void rope_reuse_inplace_or_view(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const at::Tensor k_dst = argument(op, stack, 0).toTensor();
  const at::Tensor v_dst = argument(op, stack, 1).toTensor();
  // bump_version below refuses an inference tensor outside inference mode, but only after the kernel wrote it:
  // refused first, so that nothing is written.
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_dst", k_dst}, {"v_dst", v_dst}}) {
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "rope_reuse_: ", name,
                " is an inference tensor (made under torch.inference_mode()): update it in place under "
                "torch.inference_mode() too");
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  k_dst.unsafeGetTensorImpl()->bump_version();
  v_dst.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(semshare, Autograd, m) {
  m.impl("rope_reuse_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("partial_attn", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
}

TORCH_LIBRARY_IMPL(semshare, ADInplaceOrView, m) {
  m.impl("rope_reuse_", torch::CppFunction::makeFromBoxedFunction<&rope_reuse_inplace_or_view>());
}

#ifdef SEMSHARE_PYTHON_MODULE
// `import semshare_ops._C` loads this library (and so runs the registrations above) without pybind11:
// a module with one constant is all Python needs. Built with the limited API so one wheel serves every
// CPython >= 3.10.
#include <Python.h>
#include <torch/version.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // The torch release this library was compiled against. Torch keeps no C++ ABI across releases, so Python
  // refuses to use the library under another one (semshare_ops/ops/__init__.py) instead of risking wrong results.
  if (module != nullptr && PyModule_AddStringConstant(module, "TORCH_VERSION", TORCH_VERSION) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
