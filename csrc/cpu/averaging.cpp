// CPU ops of weight averaging: the K-input weighted sum (uniform/weighted averages, soups) and the
// in-place lerp behind EMA and SWA updates, on the shared host paths (common/host_paths.h); the
// inner loops are in kernels/averaging.cpp.
#include "common/host_paths.h"
#include "cpu/kernels.h"

#include <torch/library.h>

namespace fused_optim {

DEFINE_DISPATCH(weighted_sum_stub);
DEFINE_DISPATCH(lerp_stub);
REGISTER_AVX512_DISPATCH(weighted_sum_stub, nullptr)
REGISTER_AVX512_DISPATCH(lerp_stub, nullptr)

namespace {

void multi_tensor_weighted_sum_inplace_cpu(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out) {
  weighted_sum_host(inputs, weights, out, c10::kCPU, [&](at::ScalarType, const std::vector<at::Tensor>& dst,
                                                         const std::vector<std::vector<at::Tensor>>& srcs) {
    weighted_sum_stub(c10::kCPU, srcs, weights.vec(), dst);
  });
}

std::vector<at::Tensor> multi_tensor_weighted_sum_cpu(at::TensorList inputs, at::ArrayRef<double> weights) {
  std::vector<at::Tensor> out = weighted_sum_outputs(inputs, weights);
  multi_tensor_weighted_sum_inplace_cpu(inputs, weights, out);
  return out;
}

void multi_tensor_lerp_cpu(at::TensorList self, at::TensorList end, const at::Tensor& weight) {
  lerp_host(self, end, weight, c10::kCPU, [&](at::ScalarType, const std::vector<at::Tensor>& selfs,
                                              const std::vector<at::Tensor>& ends, std::optional<double> w) {
    lerp_stub(c10::kCPU, selfs, ends, *w);  // on the CPU, the weight is on the CPU too
  });
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("multi_tensor_weighted_sum", &multi_tensor_weighted_sum_cpu);
  m.impl("multi_tensor_weighted_sum_", &multi_tensor_weighted_sum_inplace_cpu);
  m.impl("multi_tensor_lerp_", &multi_tensor_lerp_cpu);
}

} // namespace fused_optim
