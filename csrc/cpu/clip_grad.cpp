// CPU ops of gradient clipping: multi-tensor norm, scale by a tensor coefficient, clip by norm
// (norm + coefficient + scale in one call) and clip by value, on the shared host paths
// (common/host_paths.h); the inner loops are in kernels/clip_grad.cpp.
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "cpu/kernels.h"
#include "cpu/ops.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace fused_optim {

DEFINE_DISPATCH(norm_stub);
DEFINE_DISPATCH(scale_stub);
DEFINE_DISPATCH(clamp_stub);
REGISTER_AVX512_DISPATCH(norm_stub, nullptr)
REGISTER_AVX512_DISPATCH(scale_stub, nullptr)
REGISTER_AVX512_DISPATCH(clamp_stub, nullptr)

namespace cpu {

// The accumulator kind of a norm order p (2 -> kSumSquares, inf -> kMax, ...).
NormKind norm_kind(double p) {
  if (p == 1.0) return NormKind::kSumAbs;
  if (p == 2.0) return NormKind::kSumSquares;
  if (p == 0.0) return NormKind::kCount;
  if (p == INFINITY) return NormKind::kMax;
  if (p == -INFINITY) return NormKind::kMin;
  return NormKind::kSumPow;
}

// The norm of order p from its accumulator.
double norm_from_acc(double acc, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kSumSquares: return std::sqrt(acc);
    case NormKind::kSumPow: return std::pow(acc, 1.0 / p);
    default: return acc;  // sums of |x| and counts are their norms; so are max and min
  }
}

// The total as torch.nn.utils.get_total_norm defines it: the norm of the vector of per-tensor norms,
// its sum held as fp32 holds it when the norms' dtype is not fp64 (torch sums them in that dtype).
double total_norm(const std::vector<double>& norms, NormKind kind, double p, at::ScalarType dtype) {
  double total = kind == NormKind::kMin ? INFINITY : 0.0;
  for (double n : norms) {
    switch (kind) {
      case NormKind::kSumAbs: total += n; break;
      case NormKind::kSumSquares: total += n * n; break;
      case NormKind::kSumPow: total += std::pow(n, p); break;
      case NormKind::kCount: total += n != 0.0; break;  // torch: the number of non-zero tensors
      case NormKind::kMax: total = (std::isnan(total) || total > n) ? total : n; break;
      case NormKind::kMin: total = (std::isnan(total) || total < n) ? total : n; break;
    }
  }
  return norm_from_acc(sum_in_opmath_range(total, dtype != at::kDouble), kind, p);
}

namespace {

// Per-tensor norms (fp64) of all tensors, one kernel call per dtype.
std::vector<double> per_tensor_norms(at::TensorList tensors, double p) {
  const NormKind kind = norm_kind(p);
  std::vector<double> norms(tensors.size());
  for_each_dense_subset(tensors, [&](at::ScalarType dtype, const std::vector<int64_t>& idx, const std::vector<at::Tensor>& dense) {
    std::vector<double> acc(idx.size());
    norm_stub(c10::kCPU, dense, kind, p, acc.data());
    for (size_t k = 0; k < idx.size(); ++k) {
      norms[idx[k]] = norm_from_acc(sum_in_opmath_range(acc[k], dtype != at::kDouble), kind, p);
    }
  });
  return norms;
}

} // namespace

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(
    at::TensorList tensors, double norm_type, bool per_tensor, bool error_if_nonfinite) {
  check_norm_args(tensors, norm_type, c10::kCPU);
  const at::ScalarType dtype = norm_dtype(tensors);
  const auto options = at::TensorOptions().dtype(dtype);
  const std::vector<double> norms = per_tensor_norms(tensors, norm_type);
  at::Tensor total = scalar_result(total_norm(norms, norm_kind(norm_type), norm_type, dtype), options);
  if (error_if_nonfinite) {
    check_finite_norm(total, norm_type);
  }
  at::Tensor each = at::empty({per_tensor ? static_cast<int64_t>(norms.size()) : 0}, options.dtype(at::kDouble));
  if (per_tensor) {
    std::copy(norms.begin(), norms.end(), each.mutable_data_ptr<double>());
  }
  return {total, each.to(options.dtype())};
}

// Multiplies every tensor by scale (a tensor listed twice is scaled twice, as by torch's foreach
// ops), writing nothing when scale is 1.
void scale_in_place(at::TensorList tensors, double scale) {
  if (scale == 1.0) {
    return;
  }
  for_each_dense_group({tensors}, [&](at::ScalarType, const std::vector<at::Tensor>& written,
                                      const std::vector<std::vector<at::Tensor>>&) { scale_stub(c10::kCPU, written, scale); });
}

namespace {

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  check_scale_args(tensors, scale, c10::kCPU);
  scale_in_place(tensors, scale.item<double>());
}

at::Tensor clip_grad_norm_cpu(at::TensorList grads, double max_norm, double norm_type, bool error_if_nonfinite) {
  return clip_grad_norm_host(
      grads, max_norm, norm_type, error_if_nonfinite, c10::kCPU,
      [](at::TensorList g, double p, bool error) { return std::get<0>(multi_tensor_norm_cpu(g, p, false, error)); },
      [](at::TensorList g, const at::Tensor& coef) { scale_in_place(g, coef.item<double>()); });
}

void clip_grad_value_cpu(at::TensorList grads, double clip_value) {
  clip_grad_value_host(grads, clip_value, c10::kCPU, [&](at::ScalarType, const std::vector<at::Tensor>& g) {
    clamp_stub(c10::kCPU, g, clip_value);
  });
}

} // namespace
} // namespace cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("multi_tensor_norm", &cpu::multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &cpu::multi_tensor_scale_cpu);
  m.impl("clip_grad_norm_", &cpu::clip_grad_norm_cpu);
  m.impl("clip_grad_value_", &cpu::clip_grad_value_cpu);
}

} // namespace fused_optim
