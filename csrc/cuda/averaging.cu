// CUDA kernels of weight averaging: the K-input weighted sum (each input read once, each output
// written once, in op-math precision) and the in-place lerp behind EMA and SWA updates, whose
// weight may stay in device memory (no host synchronization).
#include "common/tensor_list.h"
#include "cuda/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Lerp.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>

namespace fused_optim::cuda {
namespace {

// The most inputs one pass takes: the launcher's depth less the output list.
constexpr int kMaxInputs = kMaxDepth - 1;

// out = (kAccumulate ? out : 0) + sum_m w[m] * in[m] over kInputs inputs (lists 0..kInputs-1, of
// scalar_t; out is list kInputs, of out_t). Each input of a position is read before out is
// written: out may alias one.
template <typename scalar_t, typename out_t, int kInputs, bool kAccumulate>
struct WeightedSum {
  __device__ void operator()(TensorListMetadata<kInputs + 1>& meta, std::array<double, kMaxInputs> w) const {
    using T = at::opmath_type<scalar_t>;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    auto* out = static_cast<out_t*>(meta.addresses[kInputs][tensor]);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      T acc = kAccumulate ? static_cast<T>(out[i]) : T(0);
#pragma unroll
      for (int m = 0; m < kInputs; ++m) {
        acc += static_cast<T>(w[m]) * static_cast<T>(static_cast<const scalar_t*>(meta.addresses[m][tensor])[i]);
      }
      out[i] = static_cast<out_t>(acc);
    }
  }
};

// One pass over lists[0..n) into out, n <= kMaxInputs (the template depth is chosen at run time).
template <typename scalar_t, typename out_t, bool kAccumulate, int kInputs = 1>
void weighted_sum_pass(std::vector<std::vector<at::Tensor>> lists, const std::array<double, kMaxInputs>& w, int n) {
  if constexpr (kInputs < kMaxInputs) {
    if (n > kInputs) {
      weighted_sum_pass<scalar_t, out_t, kAccumulate, kInputs + 1>(std::move(lists), w, n);
      return;
    }
  }
  multi_tensor_apply<kInputs + 1>(lists, 0, WeightedSum<scalar_t, out_t, kInputs, kAccumulate>{}, w);
}

// out = lists[0], the K input lists lists[1..K], position-aligned.
void weighted_sum_into(const std::vector<at::TensorList>& lists, at::ArrayRef<double> weights) {
  const size_t k = weights.size();
  const DenseTargets targets(lists[0]);
  std::vector<std::vector<at::Tensor>> laid_out;
  for (size_t m = 0; m < k; ++m) {
    laid_out.push_back(in_layout_of(lists[m + 1], targets.dense()));
  }
  // The passes of weighted_sum_passes (common/launch_plan.h). Beyond one pass, the sum goes into
  // op-math (fp32 for fp16/bf16) temporaries (an output may alias an input that a later pass reads),
  // rounded into the outputs once at the end: the same sum, in the same order and precision, as one
  // pass over all K.
  const auto passes = weighted_sum_passes(static_cast<int64_t>(k));
  const bool folded = passes.size() > 1;
  for (const auto& [dtype, idx] : group_by_dtype(lists[0])) {
    std::vector<at::Tensor> dst = select(targets.dense(), idx);
    if (folded) {
      for (at::Tensor& t : dst) {
        t = at::empty_like(t, t.options().dtype(at::toOpMathType(dtype)));
      }
    }
    for (const auto& [first, count] : passes) {
      const bool accumulate = first > 0;
      const int n = static_cast<int>(count);
      std::vector<std::vector<at::Tensor>> launch;
      std::array<double, kMaxInputs> w{};
      for (int m = 0; m < n; ++m) {
        launch.push_back(select(laid_out[first + m], idx));
        w[m] = weights[first + m];
      }
      launch.push_back(dst);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_weighted_sum_cuda", [&] {
        if (!folded) {
          weighted_sum_pass<scalar_t, scalar_t, false>(launch, w, n);
        } else if (accumulate) {
          weighted_sum_pass<scalar_t, at::opmath_type<scalar_t>, true>(launch, w, n);
        } else {
          weighted_sum_pass<scalar_t, at::opmath_type<scalar_t>, false>(launch, w, n);
        }
      });
    }
    if (folded) {
      for (size_t i = 0; i < idx.size(); ++i) {
        targets.dense()[idx[i]].copy_(dst[i]);
      }
    }
  }
  targets.write_back();
}

void multi_tensor_weighted_sum_inplace_cuda(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out) {
  check_weighted_sum_args(inputs, weights, out, c10::kCUDA);
  run_in_sequential_passes(weighted_sum_lists(inputs, weights, out), 1, [&](const std::vector<at::TensorList>& lists) {
    weighted_sum_into(lists, weights);
  });
}

std::vector<at::Tensor> multi_tensor_weighted_sum_cuda(at::TensorList inputs, at::ArrayRef<double> weights) {
  std::vector<at::Tensor> out = weighted_sum_outputs(inputs, weights);
  multi_tensor_weighted_sum_inplace_cuda(inputs, weights, out);
  return out;
}

// self = lerp(self, end, w) with torch's formula (at::native::lerp); w from device memory when
// w_f or w_d is set, else the host value.
template <typename scalar_t>
struct Lerp {
  __device__ void operator()(TensorListMetadata<2>& meta, const float* w_f, const double* w_d, double w_host) const {
    using T = at::opmath_type<scalar_t>;
    const T w = w_d != nullptr ? static_cast<T>(*w_d) : w_f != nullptr ? static_cast<T>(*w_f) : static_cast<T>(w_host);
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    auto* self = static_cast<scalar_t*>(meta.addresses[0][tensor]);
    const auto* other = static_cast<const scalar_t*>(meta.addresses[1][tensor]);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      self[i] = static_cast<scalar_t>(at::native::lerp(static_cast<T>(self[i]), static_cast<T>(other[i]), w));
    }
  }
};

void multi_tensor_lerp_cuda(at::TensorList self, at::TensorList end, const at::Tensor& weight) {
  check_lerp_lists(self, end, c10::kCUDA);
  if (self.empty()) {
    return;
  }
  const std::optional<double> host_weight = check_weight_tensor(weight, "weight", self[0].device());
  // A device weight is read by the kernel as fp32 or fp64 (the SWA count's 1 / (n + 1) is fp64).
  const at::Tensor w = host_weight ? weight : (weight.scalar_type() == at::kDouble ? weight : weight.to(at::kFloat));
  const float* w_f = !host_weight && w.scalar_type() == at::kFloat ? w.data_ptr<float>() : nullptr;
  const double* w_d = !host_weight && w.scalar_type() == at::kDouble ? w.data_ptr<double>() : nullptr;
  run_in_sequential_passes({self, end}, 1, [&](const std::vector<at::TensorList>& lists) {
    const DenseTargets targets(lists[0]);
    const std::vector<at::Tensor> ends = in_layout_of(lists[1], targets.dense());
    for (const auto& [dtype, idx] : group_by_dtype(lists[0])) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_lerp_cuda", [&] {
        multi_tensor_apply<2>({select(targets.dense(), idx), select(ends, idx)}, 0, Lerp<scalar_t>{}, w_f, w_d,
                              host_weight.value_or(0.0));
      });
    }
    targets.write_back();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("multi_tensor_weighted_sum", &multi_tensor_weighted_sum_cuda);
  m.impl("multi_tensor_weighted_sum_", &multi_tensor_weighted_sum_inplace_cuda);
  m.impl("multi_tensor_lerp_", &multi_tensor_lerp_cuda);
}

} // namespace fused_optim::cuda
