// Argument checks of fused_optim._C that run without an op call: _C.check_pre_step(params, grads,
// l1, l2, max_norm, norm_type, clip_value) raises what pre_step_ would raise (the same C++ checks,
// the same Python exception types), writing nothing. fused_optim/step.py runs it before the paths
// that write in several calls (param groups with their own coefficients, the separate calls), so
// that a call refused by its second write has not made its first.
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "common/host_paths.h"

namespace {

std::vector<at::Tensor> tensors_of(PyObject* list, const char* name) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  std::vector<at::Tensor> tensors;
  tensors.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    TORCH_CHECK_TYPE(THPVariable_Check(item), name, "[", i, "] must be a tensor, got ", Py_TYPE(item)->tp_name);
    tensors.push_back(THPVariable_Unpack(item));
  }
  return tensors;
}

std::optional<double> optional_double(PyObject* obj) {
  return obj == Py_None ? std::nullopt : std::optional<double>(PyFloat_AsDouble(obj));
}

PyObject* check_pre_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj = nullptr, *grads_obj = nullptr, *max_norm = nullptr, *clip_value = nullptr;
  double l1 = 0.0, l2 = 0.0, norm_type = 2.0;
  if (!PyArg_ParseTuple(args, "O!O!ddOdO", &PyList_Type, &params_obj, &PyList_Type, &grads_obj, &l1, &l2, &max_norm,
                        &norm_type, &clip_value)) {
    return nullptr;
  }
  const std::vector<at::Tensor> params = tensors_of(params_obj, "params"), grads = tensors_of(grads_obj, "grads");
  const std::optional<double> max_norm_value = optional_double(max_norm);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  const std::optional<double> clip = optional_double(clip_value);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  const c10::DeviceType device = params.empty() ? c10::kCPU : params[0].device().type();
  fused_optim::check_pre_step_args(params, grads, l1, l2, max_norm_value, norm_type, clip, device);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

} // namespace

PyMethodDef fused_optim_check_methods[] = {
    {"check_pre_step", check_pre_step, METH_VARARGS,
     "check_pre_step(params, grads, l1, l2, max_norm, norm_type, clip_value) -> None: pre_step_'s checks"},
    {nullptr, nullptr, 0, nullptr}};
