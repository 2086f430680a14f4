// CUDA kernels of gradient clipping: multi-tensor norms (per-chunk partials, then per-tensor norms,
// a block each, then the total, each in the fixed order of common/reduce_order.h; the last two
// steps are in cuda/norm_from_chunks.cuh, which the pre-step shares), scaling by a coefficient
// read from device memory (blocks exit without writing when it is 1) and clamping in one pass.
// pre_step_ (csrc/cuda/pre_step.cu) runs on the norm, the scaling and the clamp (cuda/ops.h).
// clip_grad_norm_ makes no host synchronization unless error_if_nonfinite asks for the norm's value.
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "common/reduce_order.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/norm_from_chunks.cuh"
#include "cuda/ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/OffsetCalculator.cuh>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace fused_optim::cuda {
namespace {

// A chunk's partial: its elements in the order of common/reduce_order.h (each thread folds at most
// kThreadRun of them in the op-math type T), written at the chunk's global index.
template <typename scalar_t>
struct NormPartials {
  __device__ void operator()(TensorListMetadata<1>& meta, Kind kind, double p, double* partials) const {
    using T = at::opmath_type<scalar_t>;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    const auto* x = static_cast<const scalar_t*>(meta.addresses[0][tensor]);
    const double acc = block_combine(kind, fold_elements(kind, static_cast<T>(p), begin + threadIdx.x, end, blockDim.x,
                                                         [&](int64_t i) { return static_cast<T>(x[i]); }));
    if (threadIdx.x == 0) {
      partials[meta.first_global_chunk + blockIdx.x] = acc;
    }
  }
};

// x *= *scale, skipped (no write) when *scale == 1: the coefficient stays in device memory.
template <typename scalar_t>
struct ScaleByDeviceCoefficient {
  __device__ void operator()(TensorListMetadata<1>& meta, const float* scale_f, const double* scale_d) const {
    using T = at::opmath_type<scalar_t>;
    const T s = scale_d != nullptr ? static_cast<T>(*scale_d) : static_cast<T>(*scale_f);
    if (s == T(1)) {
      return;
    }
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    auto* x = static_cast<scalar_t*>(meta.addresses[0][tensor]);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      x[i] = static_cast<scalar_t>(static_cast<T>(x[i]) * s);
    }
  }
};

// The same for one tensor that is not dense (a strided view), element by element through its
// strides: no copy in and out, so no write either when *scale == 1.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockSize) scale_strided(
    scalar_t* x, OffsetCalculator<1, uint64_t> offsets, int64_t numel, const float* scale_f, const double* scale_d) {
  using T = at::opmath_type<scalar_t>;
  const T s = scale_d != nullptr ? static_cast<T>(*scale_d) : static_cast<T>(*scale_f);
  if (s == T(1)) {
    return;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    scalar_t& v = x[offsets.get(static_cast<uint64_t>(i))[0]];
    v = static_cast<scalar_t>(static_cast<T>(v) * s);
  }
}

// Element offsets of a strided tensor in the order OffsetCalculator walks (first dimension fastest).
OffsetCalculator<1, uint64_t> element_offsets(const at::Tensor& t) {
  std::vector<int64_t> sizes(t.sizes().rbegin(), t.sizes().rend());
  std::vector<int64_t> strides(t.strides().rbegin(), t.strides().rend());
  const int64_t* stride_lists[] = {strides.data()};
  return OffsetCalculator<1, uint64_t>(static_cast<int>(t.dim()), sizes.data(), stride_lists);
}

template <typename scalar_t>
struct Clamp {
  __device__ void operator()(TensorListMetadata<1>& meta, double clip_value) const {
    using T = at::opmath_type<scalar_t>;
    // torch's clamp rounds its bounds to the tensor's dtype first.
    const T hi = static_cast<T>(static_cast<scalar_t>(clip_value));
    const T lo = static_cast<T>(static_cast<scalar_t>(-clip_value));
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    auto* x = static_cast<scalar_t*>(meta.addresses[0][tensor]);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      x[i] = static_cast<scalar_t>(clamp_like_torch(static_cast<T>(x[i]), lo, hi));
    }
  }
};

} // namespace

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(
    at::TensorList tensors, double norm_type, bool per_tensor, bool error_if_nonfinite) {
  check_norm_args(tensors, norm_type, kDeviceType);
  const Kind kind = norm_kind(norm_type);
  std::vector<at::Tensor> dense;
  for (const at::Tensor& t : tensors) {
    dense.push_back(as_dense(t));
  }
  const auto [total, per] = norm_from_chunks(dense, kind, norm_type, [&](at::ScalarType dtype, const std::vector<int64_t>& idx, int64_t first, double* partials) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_norm_cuda", [&] {
      multi_tensor_apply<1>({select(dense, idx)}, first, NormPartials<scalar_t>{}, kind, norm_type, partials);
    });
  });
  const auto dtype = norm_dtype(tensors);
  if (error_if_nonfinite) {  // the one case that reads the norm on the host, as torch does
    check_finite_norm(total.to(dtype), norm_type);
  }
  return {total.to(dtype), per_tensor ? per.to(dtype) : at::empty({0}, tensors[0].options().dtype(dtype))};
}

// Scales every tensor by `scale`, a one-element tensor on the tensors' device (read as fp64 when it
// is fp64, else as fp32). Dense tensors go through the launcher, other non-overlapping ones (rare)
// one kernel each through their strides; neither writes when the coefficient is 1.
void scale_by(at::TensorList tensors, const at::Tensor& scale) {
  const at::Tensor s = scale.scalar_type() == at::kDouble ? scale : scale.to(at::kFloat);
  const float* s_f = s.scalar_type() == at::kFloat ? s.data_ptr<float>() : nullptr;
  const double* s_d = s.scalar_type() == at::kDouble ? s.data_ptr<double>() : nullptr;
  const auto scale_dense = [&](const std::vector<at::Tensor>& dense) {
    for (const auto& [dtype, idx] : group_by_dtype(dense)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_scale_cuda", [&] {
        multi_tensor_apply<1>({select(dense, idx)}, 0, ScaleByDeviceCoefficient<scalar_t>{}, s_f, s_d);
      });
    }
  };
  run_in_sequential_passes({tensors}, 1, [&](const std::vector<at::TensorList>& lists) {
    std::vector<at::Tensor> dense, copied;
    std::vector<std::pair<at::Tensor, OffsetCalculator<1, uint64_t>>> strided;
    for (const at::Tensor& t : lists[0]) {
      if (t.is_non_overlapping_and_dense()) {
        dense.push_back(t);
      } else if (t.numel() > 0 && t.dim() <= MAX_DIMS && provably_non_overlapping(t)) {
        strided.emplace_back(t, element_offsets(t));
      } else if (t.numel() > 0) {
        // Elements that may share memory (scaled once each, as the CPU does), or more dims than
        // OffsetCalculator takes: a dense copy, scaled, written back.
        copied.push_back(t);
      }
    }
    scale_dense(dense);
    if (!copied.empty()) {
      const DenseTargets targets(copied);
      scale_dense(targets.dense());
      targets.write_back();
    }
    for (const auto& [t, offsets] : strided) {
      const c10::cuda::CUDAGuard guard(t.device());
      const int64_t blocks = std::min<int64_t>((t.numel() + kBlockSize - 1) / kBlockSize, 65535);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "multi_tensor_scale_cuda", [&] {
        launch(scale_strided<scalar_t>, blocks, kBlockSize, c10::cuda::getCurrentCUDAStream(), t.data_ptr<scalar_t>(), offsets,
               t.numel(), s_f, s_d);
      });
    }
  });
}

// The clamp of one dtype group of dense gradients (clip_grad_value_'s and pre_step_'s).
void clamp_group(at::ScalarType dtype, const std::vector<at::Tensor>& g, double clip_value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clip_grad_value_cuda", [&] {
    multi_tensor_apply<1>({g}, 0, Clamp<scalar_t>{}, clip_value);
  });
}

namespace {

void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& scale) {
  check_scale_args(tensors, scale, kDeviceType);
  if (!tensors.empty()) {
    scale_by(tensors, device_scalar(scale, tensors[0].device(), "multi_tensor_scale_", "scale"));
  }
}

// The coefficient stays on the device: no host synchronization unless error_if_nonfinite.
at::Tensor clip_grad_norm_cuda(at::TensorList grads, double max_norm, double norm_type, bool error_if_nonfinite) {
  return clip_grad_norm_host(
      grads, max_norm, norm_type, error_if_nonfinite, kDeviceType,
      [](at::TensorList g, double p, bool error) { return std::get<0>(multi_tensor_norm_cuda(g, p, false, error)); },
      [](at::TensorList g, const at::Tensor& coef) { scale_by(g, coef); });
}

void clip_grad_value_cuda(at::TensorList grads, double clip_value) {
  clip_grad_value_host(grads, clip_value, kDeviceType, [&](at::ScalarType dtype, const std::vector<at::Tensor>& g) {
    clamp_group(dtype, g, clip_value);
  });
}

} // namespace

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cuda);
  m.impl("clip_grad_norm_", &clip_grad_norm_cuda);
  m.impl("clip_grad_value_", &clip_grad_value_cuda);
}

} // namespace fused_optim::cuda
