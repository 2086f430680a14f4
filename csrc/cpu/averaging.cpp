// CPU ops of weight averaging: the K-input weighted sum (uniform/weighted averages, soups) and the
// in-place lerp behind EMA and SWA updates. Arguments are checked before anything is written; the
// inner loops are in kernels/averaging.cpp.
#include "common/tensor_list.h"
#include "cpu/kernels.h"

#include <torch/library.h>


namespace fused_optim {

DEFINE_DISPATCH(weighted_sum_stub);
DEFINE_DISPATCH(lerp_stub);
REGISTER_AVX512_DISPATCH(weighted_sum_stub, nullptr)
REGISTER_AVX512_DISPATCH(lerp_stub, nullptr)

namespace {

void multi_tensor_weighted_sum_inplace_cpu(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out) {
  check_weighted_sum_args(inputs, weights, out, c10::kCPU);
  // lists: out, then the K input lists, position-aligned.
  run_in_sequential_passes(weighted_sum_lists(inputs, weights, out), 1, [&](const std::vector<at::TensorList>& lists) {
    const DenseTargets targets(lists[0]);
    std::vector<std::vector<at::Tensor>> laid_out;
    for (size_t m = 1; m < lists.size(); ++m) {
      laid_out.push_back(in_layout_of(lists[m], targets.dense()));
    }
    for (const auto& [dtype, idx] : group_by_dtype(lists[0])) {
      std::vector<std::vector<at::Tensor>> selected;
      for (const auto& list : laid_out) {
        selected.push_back(select(list, idx));
      }
      weighted_sum_stub(c10::kCPU, selected, weights.vec(), select(targets.dense(), idx));
    }
    targets.write_back();
  });
}

std::vector<at::Tensor> multi_tensor_weighted_sum_cpu(at::TensorList inputs, at::ArrayRef<double> weights) {
  std::vector<at::Tensor> out = weighted_sum_outputs(inputs, weights);
  multi_tensor_weighted_sum_inplace_cpu(inputs, weights, out);
  return out;
}

void multi_tensor_lerp_cpu(at::TensorList self, at::TensorList end, const at::Tensor& weight_tensor) {
  const double weight = *check_weight_tensor(weight_tensor, "weight", c10::kCPU);
  check_lerp_lists(self, end, c10::kCPU);
  run_in_sequential_passes({self, end}, 1, [&](const std::vector<at::TensorList>& lists) {
    const DenseTargets targets(lists[0]);
    const std::vector<at::Tensor> ends = in_layout_of(lists[1], targets.dense());
    for (const auto& [dtype, idx] : group_by_dtype(lists[0])) {
      lerp_stub(c10::kCPU, select(targets.dense(), idx), select(ends, idx), weight);
    }
    targets.write_back();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("multi_tensor_weighted_sum", &multi_tensor_weighted_sum_cpu);
  m.impl("multi_tensor_weighted_sum_", &multi_tensor_weighted_sum_inplace_cpu);
  m.impl("multi_tensor_lerp_", &multi_tensor_lerp_cpu);
}

} // namespace fused_optim
