// Autograd of l1l2_penalty, for every device, when the native extension is loaded (without it,
// fused_optim/_library.py registers the same rule in Python). Both call the l1l2_penalty_backward
// op, which holds the formula.
//
// Why C++: a Python autograd kernel converts a Tensor[] argument to Python and back on every call,
// which cost ~290 us for 2000 tensors here (about as much as the fused kernel itself).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

namespace fused_optim {
namespace {

at::Tensor call_penalty(at::TensorList tensors, double l1, double l2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_optim::l1l2_penalty", "")
                       .typed<at::Tensor(at::TensorList, double, double)>();
  return op.call(tensors, l1, l2);
}

std::vector<at::Tensor> call_penalty_backward(
    const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_optim::l1l2_penalty_backward", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, double, double)>();
  return op.call(grad_out, tensors, l1, l2);
}

class L1L2Penalty : public torch::autograd::Function<L1L2Penalty> {
 public:
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx, at::TensorList tensors, double l1, double l2) {
    ctx->save_for_backward(tensors.vec());
    ctx->saved_data["l1"] = l1;
    ctx->saved_data["l2"] = l2;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_penalty(tensors, l1, l2);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads = call_penalty_backward(
        grad_outputs[0], ctx->get_saved_variables(), ctx->saved_data["l1"].toDouble(),
        ctx->saved_data["l2"].toDouble());
    grads.emplace_back();  // l1
    grads.emplace_back();  // l2
    return grads;
  }
};

at::Tensor l1l2_penalty_autograd(at::TensorList tensors, double l1, double l2) {
  // Function::apply records metadata of every input even when no gradient is wanted (~100 ns a
  // tensor), so calls that need no graph skip it.
  const bool needs_graph = at::GradMode::is_enabled() &&
      std::any_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_penalty(tensors, l1, l2);
  }
  return L1L2Penalty::apply(tensors, l1, l2);
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, Autograd, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_autograd);
}

} // namespace fused_optim
