// The Python module fused_optim._C. Importing it runs the TORCH_LIBRARY_IMPL registrations of
// every kernel; the module itself reports how it was built, registers the autograd kernels that
// follow from the schemas (once fused_optim/_library.py has defined them) and holds the
// flat-buffer helpers.
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/version.h>

#include "autograd.h"
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

PyObject* register_autograd_for_namespace(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* ns = nullptr;
  if (!PyArg_ParseTuple(args, "s", &ns)) {
    return nullptr;
  }
  fused_optim::register_autograd_for_namespace(ns);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"register_autograd_for_namespace", register_autograd_for_namespace, METH_VARARGS,
     "register_autograd_for_namespace(ns): the Autograd and ADInplaceOrView kernels the schemas of the ops of "
     "namespace ns decide, for the keys nothing is registered for (csrc/autograd.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

} // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddFunctions(m, fused_optim_flat_methods) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
