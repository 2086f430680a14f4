// CPU ops of the regularization family (the L1+L2 penalty): the penalty value, its backward, and
// the in-place gradient update l1l2_grad_, on the shared host paths (common/host_paths.h: checks
// before anything is written, layouts, dtype groups); the inner loops are in
// kernels/regularization.cpp.
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "cpu/kernels.h"
#include "cpu/ops.h"

#include <torch/library.h>

namespace fused_optim {

DEFINE_DISPATCH(l1l2_sums_stub);
DEFINE_DISPATCH(l1l2_grad_stub);
// Only DEFAULT and AVX2 copies are built; on AVX512 CPUs the stub falls back to AVX2.
REGISTER_AVX512_DISPATCH(l1l2_sums_stub, nullptr)
REGISTER_AVX512_DISPATCH(l1l2_grad_stub, nullptr)

namespace {

at::Tensor l1l2_penalty_cpu(at::TensorList tensors, double l1, double l2) {
  // The sums of the fp32-op-math tensors (fp16/bf16/fp32) and of the fp64 ones apart: the former
  // held as fp32 holds them (sum_in_opmath_range).
  double abs32 = 0, square32 = 0, abs64 = 0, square64 = 0;
  l1l2_penalty_host(tensors, l1, l2, c10::kCPU, [&](at::ScalarType dtype, const std::vector<at::Tensor>& dense) {
    const auto sums = l1l2_sums_stub(c10::kCPU, dense);
    (dtype == at::kDouble ? abs64 : abs32) += sums[0];
    (dtype == at::kDouble ? square64 : square32) += sums[1];
  });
  const double total = penalty_from_sums(l1, l2, sum_in_opmath_range(abs32, true) + abs64,
                                         sum_in_opmath_range(square32, true) + square64);
  return scalar_result(total, at::TensorOptions().dtype(reduction_dtype(tensors)));
}

std::vector<at::Tensor> l1l2_penalty_backward_cpu(
    const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  return l1l2_penalty_backward_host(
      grad_out, tensors, l1, l2, c10::kCPU,
      [&](at::ScalarType, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
        const double g = grad_out.item<double>();
        l1l2_grad_stub(c10::kCPU, params, grads, g * l1, 2.0 * g * l2, /*accumulate=*/false);
      });
}

} // namespace

namespace cpu {

void l1l2_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2) {
  l1l2_grad_host(params, grads, l1, l2, c10::kCPU,
                 [&](at::ScalarType, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g) {
                   l1l2_grad_stub(c10::kCPU, p, g, l1, 2.0 * l2, /*accumulate=*/true);
                 });
}

} // namespace cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_cpu);
  m.impl("l1l2_penalty_backward", &l1l2_penalty_backward_cpu);
  m.impl("l1l2_grad_", &cpu::l1l2_grad_cpu);
}

} // namespace fused_optim
