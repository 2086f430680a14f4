// CUDA kernels of weight averaging: the K-input weighted sum (each input read once, each output
// written once, in op-math precision) and the in-place lerp behind EMA and SWA updates, whose
// weight may stay in device memory (no host synchronization).
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "cuda/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

// One dtype group: out = sum_m weights[m] * inputs[m], in the passes of weighted_sum_passes
// (common/launch_plan.h). Beyond one pass, the sum goes into op-math (fp32 for fp16/bf16)
// temporaries (an output may alias an input that a later pass reads), rounded into the outputs
// once at the end: the same sum, in the same order and precision, as one pass over all K.
void weighted_sum_group(at::ScalarType dtype, const std::vector<at::Tensor>& out,
                        const std::vector<std::vector<at::Tensor>>& inputs, at::ArrayRef<double> weights) {
  const auto passes = weighted_sum_passes(static_cast<int64_t>(weights.size()));
  const bool folded = passes.size() > 1;
  std::vector<at::Tensor> dst = out;
  if (folded) {
    for (at::Tensor& t : dst) {
      t = at::empty_like(t, t.options().dtype(at::toOpMathType(dtype)));
    }
  }
  for (const auto& [first, count] : passes) {
    const bool accumulate = first > 0;
    const int n = static_cast<int>(count);
    std::vector<std::vector<at::Tensor>> lists(inputs.begin() + first, inputs.begin() + first + n);
    std::array<double, kMaxInputs> w{};
    std::copy(weights.begin() + first, weights.begin() + first + n, w.begin());
    lists.push_back(dst);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_weighted_sum_cuda", [&] {
      if (!folded) {
        weighted_sum_pass<scalar_t, scalar_t, false>(lists, w, n);
      } else if (accumulate) {
        weighted_sum_pass<scalar_t, at::opmath_type<scalar_t>, true>(lists, w, n);
      } else {
        weighted_sum_pass<scalar_t, at::opmath_type<scalar_t>, false>(lists, w, n);
      }
    });
  }
  if (folded) {
    for (size_t i = 0; i < out.size(); ++i) {
      out[i].copy_(dst[i]);
    }
  }
}

void multi_tensor_weighted_sum_inplace_cuda(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out) {
  weighted_sum_host(inputs, weights, out, kDeviceType, [&](at::ScalarType dtype, const std::vector<at::Tensor>& dst,
                                                          const std::vector<std::vector<at::Tensor>>& srcs) {
    weighted_sum_group(dtype, dst, srcs, weights);
  });
}

std::vector<at::Tensor> multi_tensor_weighted_sum_cuda(at::TensorList inputs, at::ArrayRef<double> weights) {
  std::vector<at::Tensor> out = weighted_sum_outputs(inputs, weights);
  multi_tensor_weighted_sum_inplace_cuda(inputs, weights, out);
  return out;
}

// self = lerp(self, end, w) with torch's arithmetic (lerp_like_torch); w from device memory when
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
      self[i] = static_cast<scalar_t>(lerp_like_torch(static_cast<T>(self[i]), static_cast<T>(other[i]), w));
    }
  }
};

void multi_tensor_lerp_cuda(at::TensorList self, at::TensorList end, const at::Tensor& weight) {
  // A device weight is read by the kernel as fp32 or fp64 (the SWA count's 1 / (n + 1) is fp64),
  // from a copy (it could be one of the tensors written).
  at::Tensor w;
  lerp_host(self, end, weight, kDeviceType, [&](at::ScalarType dtype, const std::vector<at::Tensor>& selfs,
                                               const std::vector<at::Tensor>& ends, std::optional<double> host_weight) {
    if (host_weight) {
      check_not_captured_from_cpu(weight, "multi_tensor_lerp_", "weight", selfs[0].device());
    } else if (!w.defined()) {
      w = device_scalar(weight, selfs[0].device(), "multi_tensor_lerp_", "weight");
    }
    const float* w_f = !host_weight && w.scalar_type() == at::kFloat ? w.data_ptr<float>() : nullptr;
    const double* w_d = !host_weight && w.scalar_type() == at::kDouble ? w.data_ptr<double>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_lerp_cuda", [&] {
      multi_tensor_apply<2>({selfs, ends}, 0, Lerp<scalar_t>{}, w_f, w_d, host_weight.value_or(0.0));
    });
  });
}

} // namespace

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("multi_tensor_weighted_sum", &multi_tensor_weighted_sum_cuda);
  m.impl("multi_tensor_weighted_sum_", &multi_tensor_weighted_sum_inplace_cuda);
  m.impl("multi_tensor_lerp_", &multi_tensor_lerp_cuda);
}

} // namespace fused_optim::cuda
