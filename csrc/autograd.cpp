// Autograd and version counters of every op, for every device, when the native extension is
// loaded; without it, fused_optim/_library.py registers the same rules in Python:
// - the ops with a derivative register it explicitly: l1l2_penalty here (below; the fused
//   l1l2_penalty_backward op computes it, and under create_graph a formula of differentiable ATen
//   ops does, so higher orders are right), the dropout family in Python (_library.py);
// - every other op of the namespace gets its kernels from its schema, in
//   register_autograd_for_namespace (no list of names here): an op that writes a tensor (a mutable
//   schema, Tensor(a!)) has no derivative: with grad mode on it refuses to write a tensor that
//   requires grad, before anything is written (a leaf or a view of one with torch's own messages),
//   and it bumps the version counter of every tensor it wrote (ADInplaceOrView), so a tensor saved
//   for backward and overwritten is caught as torch catches it; an op that writes nothing takes
//   torch's NotImplemented fallback: an output computed from a tensor that requires grad raises
//   when backpropagated through.
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

#include "autograd.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

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

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, Autograd, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_autograd);
}

void register_autograd_for_namespace(const std::string& ns) {
  // The registrations live as long as the process, as TORCH_LIBRARY_IMPL's do.
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  auto library = [&](c10::DispatchKey key) {
    libraries.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, ns, key, __FILE__, __LINE__));
    return libraries.back().get();
  };
  torch::Library* autograd = nullptr;
  torch::Library* inplace_or_view = nullptr;
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
    if (name.getNamespace() != std::string_view(ns)) {
      continue;
    }
    const std::optional<c10::OperatorHandle> op = dispatcher.findSchema(name);
    if (!op) {
      continue;  // kernels registered for an op nobody defined
    }
    // Library::impl takes the name without its namespace ("op" or "op.overload").
    std::string impl_name = name.name.substr(ns.size() + 2);
    if (!name.overload_name.empty()) {
      impl_name += "." + name.overload_name;
    }
    const bool writes = op->schema().is_mutable();
    if (!op->hasKernelForDispatchKey(c10::DispatchKey::Autograd)) {
      autograd = autograd ? autograd : library(c10::DispatchKey::Autograd);
      autograd->impl(
          impl_name.c_str(), writes ? torch::CppFunction::makeFromBoxedFunction<&refuse_grad_requiring_writes>()
                                    : torch::autograd::autogradNotImplementedFallback());
    }
    if (writes && !op->hasKernelForDispatchKey(c10::DispatchKey::ADInplaceOrView)) {
      inplace_or_view = inplace_or_view ? inplace_or_view : library(c10::DispatchKey::ADInplaceOrView);
      inplace_or_view->impl(impl_name.c_str(), torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
    }
  }
}

} // namespace fused_optim
