// Op schemas of the `semshare` namespace (docs/contract.md section 3). Kernels register themselves per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels are registered from Python in
// semshare_ops/ops/__init__.py.
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
