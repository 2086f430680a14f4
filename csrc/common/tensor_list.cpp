#include "common/tensor_list.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <string>

#include <cmath>

namespace fused_optim {

void check_floating_list(at::TensorList tensors, const char* name, c10::DeviceType device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), name, "[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(
        at::isFloatingType(t.scalar_type()),
        name, "[", i, "] must be a real floating tensor (fp32, fp64, fp16 or bf16), got ",
        t.scalar_type());
    TORCH_CHECK(
        t.device().type() == device && t.device() == tensors[0].device(),
        name, " must all be on one ", c10::DeviceTypeName(device), " device, but ", name, "[0] is on ",
        tensors[0].device(), " and ", name, "[", i, "] is on ", t.device());
  }
}

void check_paired_lists(
    at::TensorList params, const char* params_name, at::TensorList grads, const char* grads_name) {
  TORCH_CHECK_VALUE(
      params.size() == grads.size(), params_name, " and ", grads_name,
      " must have the same length, got ", params.size(), " and ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(
        g.defined() && p.sizes() == g.sizes() && p.scalar_type() == g.scalar_type() &&
            p.device() == g.device(),
        grads_name, "[", i, "] must match ", params_name, "[", i, "] in shape, dtype and device: got ",
        g.defined() ? g.toString() : std::string("undefined"), g.sizes(), " on ",
        g.defined() ? g.device() : p.device(), " for ", p.toString(), p.sizes(), " on ", p.device());
  }
}

void check_coefficient(double value, const char* name) {
  TORCH_CHECK_VALUE(
      std::isfinite(value) && value >= 0.0, name, " must be a finite number >= 0, got ", value);
}

void check_weighted_sum_args(
    at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out, c10::DeviceType device) {
  const size_t k = weights.size();
  TORCH_CHECK_VALUE(k >= 1, "weights must hold one weight per input list, got none");
  for (size_t m = 0; m < k; ++m) {
    TORCH_CHECK_VALUE(std::isfinite(weights[m]), "weights[", m, "] must be finite, got ", weights[m]);
  }
  TORCH_CHECK_VALUE(
      inputs.size() == k * out.size(), "inputs must hold len(weights) * len(out) = ", k * out.size(),
      " tensors (one list per weight, laid end to end), got ", inputs.size());
  check_floating_list(out, "out", device);
  for (size_t m = 0; m < k; ++m) {
    const std::string name = "inputs (list " + std::to_string(m) + ")";
    check_paired_lists(out, "out", inputs.slice(m * out.size(), out.size()), name.c_str());
  }
}

std::vector<at::Tensor> weighted_sum_outputs(at::TensorList inputs, at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(
      !weights.empty() && inputs.size() % weights.size() == 0, "inputs must hold len(weights) lists of equal length, got ",
      inputs.size(), " tensors for ", weights.size(), " weights");
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < inputs.size() / weights.size(); ++i) {
    out.push_back(at::empty_like(inputs[i]));
  }
  return out;
}

std::optional<double> check_weight_tensor(const at::Tensor& weight, const char* name, c10::Device device) {
  TORCH_CHECK(
      weight.numel() == 1 && at::isFloatingType(weight.scalar_type()), name,
      " must be a floating tensor of one element, got ", weight.scalar_type(), weight.sizes());
  TORCH_CHECK(
      weight.device().is_cpu() || weight.device() == device, name, " must be on the CPU or on ", device,
      ", got ", weight.device());
  if (!weight.device().is_cpu()) {
    return std::nullopt;
  }
  const double value = weight.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", value);
  return value;
}

std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> group_by_dtype(at::TensorList tensors) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType dtype = tensors[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == dtype; });
    if (it == groups.end()) {
      groups.emplace_back(dtype, std::vector<int64_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

at::Tensor as_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

std::vector<at::Tensor> select(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& idx) {
  std::vector<at::Tensor> subset;
  subset.reserve(idx.size());
  for (int64_t i : idx) {
    subset.push_back(tensors[i]);
  }
  return subset;
}

std::vector<at::Tensor> dense_subset(at::TensorList tensors, const std::vector<int64_t>& idx) {
  std::vector<at::Tensor> subset;
  subset.reserve(idx.size());
  for (int64_t i : idx) {
    subset.push_back(as_dense(tensors[i]));
  }
  return subset;
}

std::vector<at::Tensor> in_layout_of(at::TensorList srcs, const std::vector<at::Tensor>& targets) {
  std::vector<at::Tensor> laid_out;
  laid_out.reserve(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    const at::Tensor& target = targets[i];
    laid_out.push_back(srcs[i].strides() == target.strides() ? srcs[i] : at::empty_like(target).copy_(srcs[i]));
  }
  return laid_out;
}

DenseTargets::DenseTargets(at::TensorList tensors) : originals_(tensors) {
  dense_.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    dense_.push_back(as_dense(t));
  }
}

void DenseTargets::write_back() const {
  for (size_t i = 0; i < dense_.size(); ++i) {
    if (!dense_[i].is_same(originals_[i])) {
      originals_[i].copy_(dense_[i]);
    }
  }
}

at::ScalarType reduction_dtype(at::TensorList tensors) {
  if (tensors.empty()) {
    return at::kFloat;
  }
  at::ScalarType dtype = at::toOpMathType(tensors[0].scalar_type());
  for (const at::Tensor& t : tensors) {
    dtype = c10::promoteTypes(dtype, at::toOpMathType(t.scalar_type()));
  }
  return dtype;
}

void check_norm_type(double norm_type) {
  TORCH_CHECK_VALUE(!std::isnan(norm_type), "norm_type must be a number, got nan");
}

at::ScalarType norm_dtype(at::TensorList tensors) {
  at::ScalarType dtype = tensors.empty() ? at::kFloat : tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) {
    dtype = c10::promoteTypes(dtype, t.scalar_type());
  }
  return dtype;
}

void check_finite_norm(const at::Tensor& total, double norm_type) {
  // Python prints integral floats as "2.0"; the message names the order as torch's does.
  std::ostringstream p;
  p << norm_type << (norm_type == std::floor(norm_type) && std::abs(norm_type) < 1e15 ? ".0" : "");
  TORCH_CHECK(
      std::isfinite(total.item<double>()), "The total norm of order ", p.str(),
      " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error and "
      "scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
}

} // namespace fused_optim
