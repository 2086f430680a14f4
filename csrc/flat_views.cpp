// Host-side helpers of the flat and one-view paths (fused_optim/_route.py and fused_optim/flat.py
// say what they decide and why).
// They read Python lists of tensors directly: converting a 2000-tensor list to a TensorList at
// the dispatcher costs ~0.25 ms, the very cost flat buffers remove; here it is a few ns a tensor.
// Those modules hold the same rules in Python, used when this extension is absent.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
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

// A fingerprint of a tensor's sizes and strides; fused_optim/flat.py computes the same in Python.
int64_t geometry(const at::TensorImpl* impl) {
  uint64_t h = static_cast<uint64_t>(impl->dim());
  for (int64_t d = 0; d < impl->dim(); ++d) {
    h = (h * 1000003u) ^ static_cast<uint64_t>(impl->sizes()[d]);
    h = (h * 1000003u) ^ static_cast<uint64_t>(impl->strides()[d]);
  }
  return static_cast<int64_t>(h);
}

// flat_check(params, places, expected, storage) -> (kind, index) of the first break, one pass over
// the parameters (each is a few cache lines away from the next, so what is expected of them is
// read from two packed int64 tables rather than from objects of their own):
// - places[i] = (storage offset, numel, geometry) of params[i]'s view of the buffer, whose storage
//   is the StorageImpl at address `storage`; expected[i] = (address of the TensorImpl its .grad must
//   be, 0 for None; its requires_grad);
// - kind 0 none; 1 params[index]'s data left its place; 3 params[index]'s .grad or requires_grad
//   is not as expected. Kind 1 is looked for over all entries first.
PyObject* flat_check(PyObject*, PyObject* args) {
  PyObject *params = nullptr, *places_obj = nullptr, *expected_obj = nullptr;
  unsigned long long storage = 0;
  if (!PyArg_ParseTuple(args, "O!OOK", &PyList_Type, &params, &places_obj, &expected_obj, &storage)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const at::Tensor* places = plain_tensor(places_obj);
  const at::Tensor* expected = plain_tensor(expected_obj);
  auto table_ok = [n](const at::Tensor* t, int64_t cols) {
    return t != nullptr && t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous() &&
        t->dim() == 2 && t->size(0) == n && t->size(1) == cols;
  };
  if (!table_ok(places, 3) || !table_ok(expected, 2)) {
    PyErr_SetString(PyExc_ValueError, "flat_check: tables must be contiguous int64 CPU tensors of n x 3 and n x 2");
    return nullptr;
  }
  const int64_t* place = places->const_data_ptr<int64_t>();
  const int64_t* expect = expected->const_data_ptr<int64_t>();
  Py_ssize_t first_grad_break = -1;
  for (Py_ssize_t i = 0; i < n; ++i, place += 3, expect += 2) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(params, i));
    const at::TensorImpl* impl = t == nullptr ? nullptr : t->unsafeGetTensorImpl();
    if (impl == nullptr || reinterpret_cast<uintptr_t>(impl->storage().unsafeGetStorageImpl()) != storage ||
        impl->storage_offset() != place[0] || impl->numel() != place[1] || geometry(impl) != place[2]) {
      return Py_BuildValue("(in)", 1, i);
    }
    if (first_grad_break < 0) {
      // TensorImpl's grad(), not Tensor's: no is_leaf() test for the non-leaf warning.
      const at::Tensor& grad = impl->grad();
      const auto grad_impl = grad.defined() ? reinterpret_cast<int64_t>(grad.unsafeGetTensorImpl()) : 0;
      if (grad_impl != expect[0] || impl->requires_grad() != (expect[1] != 0)) {
        first_grad_break = i;
      }
    }
  }
  if (first_grad_break >= 0) {
    return Py_BuildValue("(in)", 3, first_grad_break);
  }
  return Py_BuildValue("(in)", 0, Py_ssize_t(-1));
}

// flat_rehome(params, grad_views, expected) -> changed, or None: brings a group's gradients into its
// buffer after flat_check found one not where expected (zero_grad(set_to_none=True), then backward,
// makes each a new tensor). A new gradient is copied into its slot and replaced by the slot's view;
// a gradient gone (None) has its slot zeroed. None, having changed nothing, when a gradient is a
// view of another buffer (DDP's gradient buckets), not strided, or not shaped as its parameter:
// the call then runs per tensor on the actual gradients. `changed`: whether which parameters have a
// gradient differs from `expected` (the caller then rebuilds what it derives from that).
// In C++ because the loop over 2000 parameters is most of the cost: the Python one took ~1.5 ms.
PyObject* flat_rehome(PyObject*, PyObject* args) {
  PyObject *params = nullptr, *views = nullptr, *expected_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &params, &PyList_Type, &views, &expected_obj)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const at::Tensor* expected = plain_tensor(expected_obj);
  if (PyList_GET_SIZE(views) != n || expected == nullptr || expected->scalar_type() != at::kLong ||
      !expected->is_contiguous() || expected->numel() != 2 * n) {
    PyErr_SetString(PyExc_ValueError, "flat_rehome: params, grad views and the n x 2 table must pair up");
    return nullptr;
  }
  try {
    const int64_t* expect = expected->const_data_ptr<int64_t>();
    std::vector<std::pair<const at::Tensor*, const at::Tensor*>> copies;  // (new gradient, slot)
    std::vector<Py_ssize_t> gone;
    bool changed = false;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor* param = plain_tensor(PyList_GET_ITEM(params, i));
      const at::Tensor* slot = plain_tensor(PyList_GET_ITEM(views, i));
      TORCH_CHECK(param != nullptr && slot != nullptr, "flat_rehome: plain tensors expected");
      const at::Tensor& grad = param->grad();
      changed = changed || (grad.defined() != (expect[2 * i] != 0));
      if (!grad.defined()) {
        if (expect[2 * i] != 0) {
          gone.push_back(i);
        }
        continue;
      }
      if (grad.unsafeGetTensorImpl() == slot->unsafeGetTensorImpl()) {
        continue;
      }
      if (grad.layout() != at::kStrided || grad.is_view() || grad.requires_grad() ||
          grad.unsafeGetTensorImpl()->is_python_dispatch() || grad.sizes() != slot->sizes() ||
          grad.scalar_type() != slot->scalar_type() || grad.device() != slot->device()) {
        Py_RETURN_NONE;
      }
      copies.emplace_back(&grad, slot);
    }
    for (Py_ssize_t i : gone) {
      plain_tensor(PyList_GET_ITEM(views, i))->zero_();
    }
    // Same strides, dense, on the CPU: a memcpy each, spread over the threads; otherwise copy_.
    std::vector<size_t> fast, slow;
    for (size_t k = 0; k < copies.size(); ++k) {
      const auto& [grad, slot] = copies[k];
      const bool same_layout = grad->device().is_cpu() && grad->strides() == slot->strides() &&
          grad->unsafeGetTensorImpl()->is_non_overlapping_and_dense() && !grad->is_neg() && !grad->is_conj();
      (same_layout ? fast : slow).push_back(k);
    }
    at::parallel_for(0, static_cast<int64_t>(fast.size()), 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const auto& [grad, slot] = copies[fast[j]];
        std::memcpy(slot->data_ptr(), grad->const_data_ptr(), grad->nbytes());
      }
    });
    for (size_t k : slow) {
      copies[k].second->copy_(*copies[k].first);
    }
    for (Py_ssize_t i = 0, k = 0; i < n; ++i) {
      const at::Tensor* param = plain_tensor(PyList_GET_ITEM(params, i));
      if (k < static_cast<Py_ssize_t>(copies.size()) && &param->grad() == copies[k].first) {
        param->mutable_grad() = *copies[k].second;  // the new gradient is released here
        ++k;
      }
    }
    return PyBool_FromLong(changed);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// Gradients that land in the buffer during backward. After torch's default zero_grad()
// (set_to_none=True) backward makes each gradient a new tensor; a post-accumulate-grad hook of the
// parameter copies it into the parameter's slot right after autograd set it, while it is still in
// cache, and makes .grad the slot's view, so the next glue call finds every gradient in the buffer.
// It leaves alone a gradient it cannot take (a view of another buffer such as DDP's buckets, one
// carrying a graph (create_graph=True), a tensor subclass, another layout, shape or dtype) and a parameter whose data left its place in the buffer
// (flattened again, converted): the glue call then re-homes or runs per tensor, as without hooks.
// A tensor has one such hook: a Python hook registered before is called first; one registered by
// Python afterwards replaces this one (the glue call then copies, as without hooks).
struct LandInSlot : torch::autograd::PostAccumulateGradHook {
  LandInSlot(const at::Tensor& param, at::Tensor slot, std::unique_ptr<PostAccumulateGradHook> previous)
      : slot(std::move(slot)), data(param.storage().getWeakStorageImpl()), data_offset(param.storage_offset()),
        previous(std::move(previous)) {}

  void operator()(const torch::autograd::Variable& param) override {
    if (previous) {
      (*previous)(param);
    }
    const at::Tensor& grad = param.grad();
    const auto data_now = data.lock();
    if (!grad.defined() || grad.unsafeGetTensorImpl() == slot.unsafeGetTensorImpl() || !data_now ||
        param.storage().unsafeGetStorageImpl() != data_now.get() || param.storage_offset() != data_offset ||
        grad.layout() != at::kStrided || grad.is_view() || grad.requires_grad() ||
        grad.unsafeGetTensorImpl()->is_python_dispatch() || grad.sizes() != slot.sizes() ||
        grad.strides() != slot.strides() || grad.scalar_type() != slot.scalar_type() || grad.device() != slot.device() ||
        grad.is_neg() || grad.is_conj()) {
      return;
    }
    if (grad.device().is_cpu()) {
      // Large gradients are copied by all threads (a 64 MB one takes ~3 ms on one core).
      char* dst = static_cast<char*>(slot.data_ptr());
      const char* src = static_cast<const char*>(grad.const_data_ptr());
      at::parallel_for(0, static_cast<int64_t>(grad.nbytes()), int64_t{1} << 20, [&](int64_t begin, int64_t end) {
        std::memcpy(dst + begin, src + begin, end - begin);
      });
    } else {
      slot.copy_(grad);
    }
    param.mutable_grad() = slot;
  }

  // Under compiled autograd the hook is not traced (registering nothing here): the gradients then
  // stay where autograd put them and the next glue call copies them into the buffer.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}

  at::Tensor slot;
  c10::weak_intrusive_ptr<c10::StorageImpl> data;  // weak: no hold on a buffer flattened away
  int64_t data_offset;
  std::unique_ptr<PostAccumulateGradHook> previous;
};

// land_gradients(params, grad_views): hooks each parameter that requires grad (see LandInSlot),
// replacing the hook of an earlier flattening.
PyObject* land_gradients(PyObject*, PyObject* args) {
  PyObject *params = nullptr, *views = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &params, &PyList_Type, &views)) {
    return nullptr;
  }
  if (PyList_GET_SIZE(params) != PyList_GET_SIZE(views)) {
    PyErr_SetString(PyExc_ValueError, "land_gradients: params and grad views must pair up");
    return nullptr;
  }
  try {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
      const at::Tensor* param = plain_tensor(PyList_GET_ITEM(params, i));
      const at::Tensor* slot = plain_tensor(PyList_GET_ITEM(views, i));
      TORCH_CHECK(param != nullptr && slot != nullptr, "land_gradients: plain tensors expected");
      if (!param->requires_grad() || !param->is_leaf()) {
        continue;
      }
      auto previous = std::move(torch::autograd::impl::post_acc_grad_hooks(*param));
      if (auto* ours = dynamic_cast<LandInSlot*>(previous.get())) {
        previous = std::move(ours->previous);
      }
      torch::autograd::impl::set_post_acc_grad_hooks(
          *param, std::make_unique<LandInSlot>(*param, *slot, std::move(previous)));
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

} // namespace

PyMethodDef fused_optim_flat_methods[] = {
    {"one_view", one_view, METH_VARARGS,
     "one_view(lists: tuple[list[Tensor]], written: tuple[bool]) -> tuple[Tensor] | None"},
    {"bump_versions", bump_versions, METH_O, "bump_versions(tensors: list[Tensor]) -> None"},
    {"flat_check", flat_check, METH_VARARGS, "flat_check(params, places, expected, storage) -> (kind, index)"},
    {"flat_rehome", flat_rehome, METH_VARARGS, "flat_rehome(params, grad_views, expected) -> bool | None"},
    {"land_gradients", land_gradients, METH_VARARGS, "land_gradients(params, grad_views) -> None"},
    {nullptr, nullptr, 0, nullptr}};
