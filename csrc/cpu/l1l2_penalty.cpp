// CPU ops of the L1+L2 penalty family: the penalty value, its backward, and the in-place gradient
// update l1l2_grad_. Arguments are checked here, before anything is written; the inner loops are
// in kernels/l1l2_penalty.cpp.
#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cpu/kernels.h"

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace fused_optim {

DEFINE_DISPATCH(l1l2_sums_stub);
DEFINE_DISPATCH(l1l2_grad_stub);
// Only DEFAULT and AVX2 copies are built; on AVX512 CPUs the stub falls back to AVX2.
REGISTER_AVX512_DISPATCH(l1l2_sums_stub, nullptr)
REGISTER_AVX512_DISPATCH(l1l2_grad_stub, nullptr)

namespace {

at::Tensor l1l2_penalty_cpu(at::TensorList tensors, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", c10::kCPU);
  double total = 0;
  for (const auto& [dtype, idx] : group_by_dtype(tensors)) {
    const auto sums = l1l2_sums_stub(c10::kCPU, dense_subset(tensors, idx));
    total += penalty_from_sums(l1, l2, sums[0], sums[1]);
  }
  return scalar_result(total, at::TensorOptions().dtype(reduction_dtype(tensors)));
}

// Runs the gradient kernel once per dtype group of params.
void add_penalty_grad(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs, double a, double b,
    bool accumulate) {
  for (const auto& [dtype, idx] : group_by_dtype(params)) {
    l1l2_grad_stub(c10::kCPU, select(params, idx), select(outs, idx), a, b, accumulate);
  }
}

std::vector<at::Tensor> l1l2_penalty_backward_cpu(
    const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", c10::kCPU);
  TORCH_CHECK(grad_out.numel() == 1, "grad_out must hold one element, got shape ", grad_out.sizes());
  const double g = grad_out.item<double>();
  std::vector<at::Tensor> params, grads;
  for (const at::Tensor& t : tensors) {
    params.push_back(as_dense(t));
    grads.push_back(at::empty_like(params.back()));  // same strides as the dense param
  }
  add_penalty_grad(params, grads, g * l1, 2.0 * g * l2, /*accumulate=*/false);
  return grads;
}

void l1l2_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(params, "params", c10::kCPU);
  check_paired_lists(params, "params", grads, "grads");
  check_writable(grads, "grads");
  check_same_or_disjoint(grads, "grads", params, "params");
  run_in_sequential_passes({grads, params}, 1, [&](const std::vector<at::TensorList>& lists) {
    // Each pair is worked on as two dense tensors of one layout; other layouts go through a copy.
    const DenseTargets targets(lists[0]);
    const std::vector<at::Tensor> dense_params = in_layout_of(lists[1], targets.dense());
    add_penalty_grad(dense_params, targets.dense(), l1, 2.0 * l2, /*accumulate=*/true);
    targets.write_back();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_cpu);
  m.impl("l1l2_penalty_backward", &l1l2_penalty_backward_cpu);
  m.impl("l1l2_grad_", &l1l2_grad_cpu);
}

} // namespace fused_optim
