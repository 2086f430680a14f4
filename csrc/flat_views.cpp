// Host-side helpers of the flat-buffer path (fused_optim/flat.py says what they decide and why).
// They read Python lists of tensors directly: converting a 2000-tensor list to a TensorList at
// the dispatcher costs ~0.25 ms, the very cost flat buffers remove; here it is a few ns a tensor.
// fused_optim/flat.py holds the same rules in Python, used when this extension is absent.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "flat_views.h"

namespace {

// The tensor of a Python object that is a plain tensor or an nn.Parameter (not a tensor subclass
// with its own dispatch, such as a DTensor, whose memory is not its local data), else nullptr.
const at::Tensor* plain_tensor(PyObject* obj) {
  // PyType_IsSubtype walks the MRO in C; THPVariable_Check's isinstance costs ~4x more a call.
  if (THPVariableClass == nullptr || !PyType_IsSubtype(Py_TYPE(obj), reinterpret_cast<PyTypeObject*>(THPVariableClass))) {
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.unsafeGetTensorImpl()->is_python_dispatch()) {
    return nullptr;
  }
  return &t;
}

struct Run {
  const at::Tensor* first = nullptr;
  int64_t begin = 0;  // in elements of the storage
  int64_t numel = 0;
};

// The run of storage a list covers when its tensors are dense, non-empty views of one storage, in
// one dtype, each starting where the previous ends; false otherwise. A written list also needs
// tensors whose version can be bumped and that autograd lets us write.
bool one_run(PyObject* list, bool written, Run& run, std::vector<const at::Tensor*>& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  tensors.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(list, i));
    if (t == nullptr || t->layout() != at::kStrided || t->is_neg() || t->is_conj()) {
      return false;
    }
    auto* impl = t->unsafeGetTensorImpl();
    if (impl->numel() == 0 || !impl->is_non_overlapping_and_dense()) {
      return false;
    }
    if (written && (t->requires_grad() || t->is_inference())) {
      return false;
    }
    if (i == 0) {
      run = {t, impl->storage_offset(), 0};
    } else if (!t->storage().is_alias_of(run.first->storage()) || t->scalar_type() != run.first->scalar_type() ||
               impl->storage_offset() != run.begin + run.numel) {
      return false;
    }
    run.numel += impl->numel();
    tensors[i] = t;
  }
  return n > 0;
}

bool runs_overlap(const Run& a, const Run& b) {
  if (!a.first->storage().is_alias_of(b.first->storage())) {
    return false;
  }
  const int64_t size = a.first->element_size();
  const int64_t a0 = a.begin * size, a1 = (a.begin + a.numel) * size;
  const int64_t b0 = b.begin * b.first->element_size(), b1 = (b.begin + b.numel) * b.first->element_size();
  return a0 < b1 && b0 < a1;
}

PyObject* one_view_impl(PyObject* lists, PyObject* written) {
  const Py_ssize_t k = PyTuple_GET_SIZE(lists);
  std::vector<Run> runs(k);
  std::vector<std::vector<const at::Tensor*>> tensors(k);
  for (Py_ssize_t j = 0; j < k; ++j) {
    PyObject* list = PyTuple_GET_ITEM(lists, j);
    if (!PyList_Check(list) || !one_run(list, PyObject_IsTrue(PyTuple_GET_ITEM(written, j)) == 1, runs[j], tensors[j])) {
      Py_RETURN_NONE;
    }
  }
  for (Py_ssize_t j = 1; j < k; ++j) {  // positions pair up element for element
    if (tensors[j].size() != tensors[0].size()) {
      Py_RETURN_NONE;
    }
    for (size_t i = 0; i < tensors[0].size(); ++i) {
      if (tensors[j][i]->sizes() != tensors[0][i]->sizes() || tensors[j][i]->strides() != tensors[0][i]->strides()) {
        Py_RETURN_NONE;
      }
    }
  }
  // Lists whose runs overlap must be the same run (the per-tensor op then reads and writes the same
  // element at each position too); a shifted overlap has per-position semantics a flat pass lacks.
  for (Py_ssize_t a = 0; a < k; ++a) {
    for (Py_ssize_t b = a + 1; b < k; ++b) {
      if (runs_overlap(runs[a], runs[b]) &&
          (runs[a].begin != runs[b].begin || runs[a].numel != runs[b].numel ||
           runs[a].first->scalar_type() != runs[b].first->scalar_type())) {
        Py_RETURN_NONE;
      }
    }
  }
  PyObject* result = PyTuple_New(k);
  if (result == nullptr) {
    return nullptr;
  }
  for (Py_ssize_t j = 0; j < k; ++j) {
    // A fresh tensor over the run: no autograd relation to the views (their versions are bumped by
    // bump_versions once the op has written), and nothing of the first view's grad or hooks.
    const at::Tensor& first = *runs[j].first;
    at::Tensor flat = at::empty({0}, first.options().requires_grad(false));
    flat.set_(first.storage(), runs[j].begin, {runs[j].numel}, {1});
    PyTuple_SET_ITEM(result, j, THPVariable_Wrap(std::move(flat)));
  }
  return result;
}

PyObject* one_view(PyObject*, PyObject* args) {
  PyObject *lists = nullptr, *written = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &lists, &PyTuple_Type, &written)) {
    return nullptr;
  }
  if (PyTuple_GET_SIZE(lists) != PyTuple_GET_SIZE(written)) {
    PyErr_SetString(PyExc_ValueError, "one_view: lists and written must have the same length");
    return nullptr;
  }
  try {
    return one_view_impl(lists, written);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* bump_versions(PyObject*, PyObject* list) {
  if (!PyList_Check(list)) {
    PyErr_SetString(PyExc_TypeError, "bump_versions: expected a list of tensors");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(list, i));
    if (t != nullptr && !t->is_inference()) {
      t->unsafeGetTensorImpl()->bump_version();
    }
  }
  Py_RETURN_NONE;
}

// flat_check(params, views, grads, requires_grad, modules, types) -> (kind, index) of the first break:
// kind 0 none; 1 params[index]'s data left views[index] (its place in the buffer); 2 modules[index]
// is no longer of class types[index] (FSDP2's fully_shard swaps the class of what it shards);
// 3 params[index].grad is not grads[index] (the grad view, or None) or its requires_grad is not
// requires_grad[index]. Kinds 1 and 2 are looked for over all entries before kind 3.
PyObject* flat_check(PyObject*, PyObject* args) {
  PyObject *params = nullptr, *views = nullptr, *grads = nullptr, *requires_grad = nullptr, *modules = nullptr,
           *types = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyList_Type, &params, &PyList_Type, &views, &PyList_Type, &grads,
                        &PyBytes_Type, &requires_grad, &PyList_Type, &modules, &PyList_Type, &types)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(views) != n || PyList_GET_SIZE(grads) != n || PyBytes_GET_SIZE(requires_grad) != n ||
      PyList_GET_SIZE(modules) != PyList_GET_SIZE(types)) {
    PyErr_SetString(PyExc_ValueError, "flat_check: lists of different lengths");
    return nullptr;
  }
  // One pass over the parameters (each is a few cache lines away from the next): the first kind-3
  // break is remembered while kinds 1 and 2 are looked for.
  const char* req = PyBytes_AS_STRING(requires_grad);
  Py_ssize_t first_grad_break = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(params, i));
    const at::Tensor& view = THPVariable_Unpack(PyList_GET_ITEM(views, i));
    if (t == nullptr || !t->storage().is_alias_of(view.storage()) ||
        t->storage_offset() != view.storage_offset() || t->sizes() != view.sizes() ||
        t->strides() != view.strides() || t->scalar_type() != view.scalar_type()) {
      return Py_BuildValue("(in)", 1, i);
    }
    if (first_grad_break < 0) {
      auto* impl = t->unsafeGetTensorImpl();
      // TensorImpl's grad(), not Tensor's: no is_leaf() test for the non-leaf warning.
      const at::Tensor& grad = impl->grad();
      PyObject* expected = PyList_GET_ITEM(grads, i);
      const bool same = expected == Py_None
          ? !grad.defined()
          : grad.defined() && grad.unsafeGetTensorImpl() == THPVariable_Unpack(expected).unsafeGetTensorImpl();
      if (!same || impl->requires_grad() != (req[i] != 0)) {
        first_grad_break = i;
      }
    }
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(modules); ++i) {
    if (reinterpret_cast<PyObject*>(Py_TYPE(PyList_GET_ITEM(modules, i))) != PyList_GET_ITEM(types, i)) {
      return Py_BuildValue("(in)", 2, i);
    }
  }
  if (first_grad_break >= 0) {
    return Py_BuildValue("(in)", 3, first_grad_break);
  }
  return Py_BuildValue("(in)", 0, Py_ssize_t(-1));
}

} // namespace

PyMethodDef fused_optim_flat_methods[] = {
    {"one_view", one_view, METH_VARARGS,
     "one_view(lists: tuple[list[Tensor]], written: tuple[bool]) -> tuple[Tensor] | None"},
    {"bump_versions", bump_versions, METH_O, "bump_versions(tensors: list[Tensor]) -> None"},
    {"flat_check", flat_check, METH_VARARGS, "flat_check(params, views, grads, requires_grad, modules, types) -> (kind, index)"},
    {nullptr, nullptr, 0, nullptr}};
