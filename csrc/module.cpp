// The Python module fused_optim._C. Importing it runs the TORCH_LIBRARY_IMPL registrations of
// every kernel; the module itself reports how it was built and holds the flat-buffer helpers and
// the argument checks that run without an op call.
#include <Python.h>

#include <torch/version.h>

#include "checks.h"
#include "flat_views.h"

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{s:s,s:O,s:s,s:O,s:s}",
      "torch_version", TORCH_VERSION,  // the torch headers it was compiled against
      "cuda", FUSED_OPTIM_WITH_CUDA ? Py_True : Py_False,
      "cpu_capabilities", FUSED_OPTIM_CPU_CAPABILITIES,  // copies of the CPU kernels built
#ifdef _OPENMP
      "openmp", Py_True,
#else
      "openmp", Py_False,
#endif
      "compiler",
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

} // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && (PyModule_AddFunctions(m, fused_optim_flat_methods) < 0 ||
                       PyModule_AddFunctions(m, fused_optim_check_methods) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
