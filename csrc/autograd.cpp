// Autograd and version counters of every op, for every device, when the native extension is
// loaded; without it, fused_optim/_library.py registers the same rules in Python:
// - l1l2_penalty: its derivative (below; the fused l1l2_penalty_backward op computes it, and under
//   create_graph a formula of differentiable ATen ops does, so higher orders are right);
// - ops that write a tensor (Tensor(a!) in their schema) have no derivative: with grad mode on they
//   refuse to write a tensor that requires grad, before anything is written (a leaf or a view of
//   one with torch's own messages), and they bump the version counter of every tensor they wrote
//   (ADInplaceOrView), so a tensor saved for backward and overwritten is caught as torch catches it;
// - the other ops without a derivative take torch's NotImplemented fallback: an output computed
//   from a tensor that requires grad raises when backpropagated through.
//
// Why C++: a Python autograd kernel converts a Tensor[] argument to Python and back on every call,
// which cost ~290 us for 2000 tensors here (about as much as the fused kernels themselves).
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/sign.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

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

// The penalty's gradient as differentiable ATen ops, the reference kernel's formula (op-math
// type, rounded once to each tensor's dtype): its own derivative is grad_out * 2 * l2 on the
// diagonal (sign's is 0), and its derivative in grad_out the gradient itself.
std::vector<at::Tensor> differentiable_penalty_grad(
    const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  std::vector<at::Tensor> grads;
  for (const at::Tensor& t : tensors) {
    const at::Tensor x = t.to(at::toOpMathType(t.scalar_type()));
    const at::Tensor g = grad_out.to(x.scalar_type());
    grads.push_back(((g * l1) * at::sign(x) + (g * (2.0 * l2)) * x).to(t.scalar_type()));
  }
  return grads;
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
    const double l1 = ctx->saved_data["l1"].toDouble(), l2 = ctx->saved_data["l2"].toDouble();
    // Grad mode is on in backward only under create_graph: then the graph of the gradient is built.
    torch::autograd::variable_list grads = at::GradMode::is_enabled()
        ? differentiable_penalty_grad(grad_outputs[0], ctx->get_saved_variables(), l1, l2)
        : call_penalty_backward(grad_outputs[0], ctx->get_saved_variables(), l1, l2);
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

// The stack entries of the arguments the op writes, with their names. Copying an entry holds its
// tensor or tensor list alive past the call (which pops the stack) at the cost of one reference.
std::vector<std::pair<c10::IValue, const std::string*>> written_args(
    const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  std::vector<std::pair<c10::IValue, const std::string*>> written;
  for (size_t a = 0; a < args.size(); ++a) {
    const c10::AliasInfo* alias = args[a].alias_info();
    if (alias != nullptr && alias->isWrite()) {
      written.emplace_back(stack[first + a], &args[a].name());
    }
  }
  return written;
}

// Calls f(tensor, argument name, index in its list or -1) for every tensor of `written`, by
// reference (no reference count touched per tensor: lists hold thousands).
template <typename F>
void for_each_written(const std::vector<std::pair<c10::IValue, const std::string*>>& written, const F& f) {
  for (const auto& [value, name] : written) {
    if (value.isTensor()) {
      f(value.toTensor(), *name, -1);
    } else if (value.isTensorList()) {
      const auto list = value.toListRef();
      for (size_t i = 0; i < list.size(); ++i) {
        f(list[i].toTensor(), *name, static_cast<int64_t>(i));
      }
    }
  }
}

std::string describe(const c10::OperatorHandle& op, const std::string& name, int64_t i) {
  return op.schema().name() + ": " + name + (i >= 0 ? "[" + std::to_string(i) + "]" : "");
}

void refuse_grad_requiring_writes(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for_each_written(written_args(op, *stack), [&](const at::Tensor& t, const std::string& name, int64_t i) {
      if (!t.defined() || !t.requires_grad()) {
        return;
      }
      TORCH_CHECK(
          !t.is_leaf(), describe(op, name, i), ": a leaf Variable that requires grad is being used in an in-place operation.");
      TORCH_CHECK(
          !(t.is_view() && t._base().is_leaf()), describe(op, name, i),
          ": a view of a leaf Variable that requires grad is being used in an in-place operation.");
      TORCH_CHECK(
          false, describe(op, name, i),
          " requires grad, and this op writes it in place without a derivative: call it under torch.no_grad() "
          "or on a detached tensor");
    });
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto written = written_args(op, *stack);
  for_each_written(written, [&](const at::Tensor& t, const std::string& name, int64_t i) {
    TORCH_CHECK(
        !t.defined() || !t.is_inference(), describe(op, name, i),
        ": Inplace update to inference tensor outside InferenceMode is not allowed. Make a clone to get a normal "
        "tensor before the in-place update");
  });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  // Once the kernel has succeeded: a refused call writes nothing.
  for_each_written(written, [](const at::Tensor& t, const std::string&, int64_t) {
    if (t.defined()) {
      torch::autograd::increment_version(t);
    }
  });
}

// Keep in step with fused_optim/_library.py's SCHEMAS (tests/test_library.py checks every op).
constexpr const char* kWritingOps[] = {
    "l1l2_grad_", "multi_tensor_scale_", "clip_grad_norm_", "clip_grad_value_", "pre_step_",
    "multi_tensor_weighted_sum_", "multi_tensor_lerp_", "dropout_", "drop_groups_"};
constexpr const char* kNoDerivativeOps[] = {
    "l1l2_penalty_backward", "multi_tensor_norm", "multi_tensor_weighted_sum", "dropout_mask"};

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, Autograd, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_autograd);
  for (const char* name : kWritingOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_requiring_writes>());
  }
  for (const char* name : kNoDerivativeOps) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(fused_optim, ADInplaceOrView, m) {
  for (const char* name : kWritingOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

} // namespace fused_optim
