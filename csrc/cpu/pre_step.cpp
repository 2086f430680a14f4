// CPU op of the pre-step: the penalty's gradient, the clip by norm and the clip by value in one
// call (pre_step_), on the shared host path (common/host_paths.h, pre_step_host); the gradient and
// its norm in one pass are in kernels/pre_step.cpp, the rest is the clip_grad and regularization
// families' (cpu/ops.h).
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "cpu/kernels.h"
#include "cpu/ops.h"

#include <torch/library.h>

namespace fused_optim {

DEFINE_DISPATCH(penalty_norm_stub);
REGISTER_AVX512_DISPATCH(penalty_norm_stub, nullptr)

namespace cpu {
namespace {

at::Tensor pre_step_cpu(at::TensorList params, at::TensorList grads, double l1, double l2,
                        std::optional<double> max_norm, double norm_type, std::optional<double> clip_value,
                        bool error_if_nonfinite) {
  const auto options = at::TensorOptions().dtype(norm_dtype(grads));
  return pre_step_host(
      params, grads, l1, l2, max_norm, norm_type, clip_value, error_if_nonfinite, c10::kCPU,
      [&](bool write) {
        // One pass per dtype group; per-tensor norms in position order, combined as
        // multi_tensor_norm combines them, so the total equals its total over the written gradients.
        const NormKind kind = norm_kind(norm_type);
        std::vector<double> norms(grads.size());
        const DenseTargets targets(grads);
        const std::vector<at::Tensor> laid_out = in_layout_of(params, targets.dense());
        for (const auto& [dtype, idx] : group_by_dtype(grads)) {
          std::vector<double> acc(idx.size());
          penalty_norm_stub(c10::kCPU, select(laid_out, idx), select(targets.dense(), idx), l1, 2.0 * l2, write, kind,
                            norm_type, acc.data());
          for (size_t k = 0; k < idx.size(); ++k) {
            norms[idx[k]] = norm_from_acc(sum_in_opmath_range(acc[k], dtype != at::kDouble), kind, norm_type);
          }
        }
        if (write) {
          targets.write_back();
        }
        return scalar_result(total_norm(norms, kind, norm_type, norm_dtype(grads)), options);
      },
      [&] { cpu::l1l2_grad_cpu(params, grads, l1, l2); },
      [&](bool error) { return std::get<0>(multi_tensor_norm_cpu(grads, norm_type, false, error)); },
      [&](const at::Tensor& coef) { scale_in_place(grads, coef.item<double>()); },
      [&](at::ScalarType, const std::vector<at::Tensor>& g) { clamp_stub(c10::kCPU, g, *clip_value); });
}


} // namespace
} // namespace cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("pre_step_", &cpu::pre_step_cpu);
}

} // namespace fused_optim
