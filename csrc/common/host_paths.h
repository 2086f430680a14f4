// The host side of every op, written once for all backends: the argument checks, the order in
// which positions that share memory are processed, dense stand-ins for other layouts, the dtype
// groups. A backend (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) passes its kernels as callables and
// registers the result; a check or a layout rule changed here changes on every backend.
#pragma once

#include "common/tensor_list.h"

#include <ATen/ops/add.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/reciprocal.h>

#include <cmath>
#include <optional>
#include <vector>

namespace fused_optim {

// The path of every op that writes lists[0] in place from the other lists (position-aligned):
// positions that share memory run in successive passes (run_in_sequential_passes), each written
// tensor is worked on as a dense tensor (a copy, written back afterwards, for other layouts) with
// the tensors it is computed from laid out alike, and kernel(dtype, written, read) runs once per
// dtype group: written holds the group's written tensors, read[m] those of lists[m + 1].
template <typename Kernel>
void for_each_dense_group(const std::vector<at::TensorList>& lists, const Kernel& kernel) {
  run_in_sequential_passes(lists, 1, [&](const std::vector<at::TensorList>& pass) {
    const DenseTargets targets(pass[0]);
    std::vector<std::vector<at::Tensor>> laid_out;
    for (size_t m = 1; m < pass.size(); ++m) {
      laid_out.push_back(in_layout_of(pass[m], targets.dense()));
    }
    for (const auto& [dtype, idx] : group_by_dtype(pass[0])) {
      std::vector<std::vector<at::Tensor>> read;
      for (const auto& list : laid_out) {
        read.push_back(select(list, idx));
      }
      kernel(dtype, select(targets.dense(), idx), read);
    }
    targets.write_back();
  });
}

// The path of reductions: reduce(dtype, idx, dense) once per dtype group of tensors, groups in
// order of first appearance (so the order of combining group results depends on the input
// alone); idx are the group's positions in tensors, dense its tensors as dense ones.
template <typename Reduce>
void for_each_dense_subset(at::TensorList tensors, const Reduce& reduce) {
  for (const auto& [dtype, idx] : group_by_dtype(tensors)) {
    reduce(dtype, idx, dense_subset(tensors, idx));
  }
}

// l1l2_penalty: sums(dtype, dense) per dtype group, which the backend adds into its total.
template <typename Sums>
void l1l2_penalty_host(at::TensorList tensors, double l1, double l2, c10::DeviceType device, const Sums& sums) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", device);
  for_each_dense_subset(tensors, [&](at::ScalarType dtype, const std::vector<int64_t>&, const std::vector<at::Tensor>& dense) {
    sums(dtype, dense);
  });
}

// l1l2_penalty_backward: new gradients laid out as the dense tensors; grad(dtype, params, grads)
// per dtype group writes grads = grad_out * (l1 * sign(p) + 2 * l2 * p).
template <typename Grad>
std::vector<at::Tensor> l1l2_penalty_backward_host(
    const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2, c10::DeviceType device, const Grad& grad) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", device);
  TORCH_CHECK(grad_out.numel() == 1, "grad_out must hold one element, got shape ", grad_out.sizes());
  std::vector<at::Tensor> params, grads;
  for (const at::Tensor& t : tensors) {
    params.push_back(as_dense(t));
    grads.push_back(at::empty_like(params.back()));  // same strides as the dense param
  }
  for (const auto& [dtype, idx] : group_by_dtype(params)) {
    grad(dtype, select(params, idx), select(grads, idx));
  }
  return grads;
}

// l1l2_grad_: add(dtype, params, grads) per dtype group adds l1 * sign(p) + 2 * l2 * p into grads.
template <typename Add>
void l1l2_grad_host(at::TensorList params, at::TensorList grads, double l1, double l2, c10::DeviceType device, const Add& add) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(params, "params", device);
  check_paired_lists(params, "params", grads, "grads");
  check_writable(grads, "grads");
  check_same_or_disjoint(grads, "grads", params, "params");
  for_each_dense_group({grads, params}, [&](at::ScalarType dtype, const std::vector<at::Tensor>& g,
                                            const std::vector<std::vector<at::Tensor>>& read) { add(dtype, read[0], g); });
}

// multi_tensor_norm's checks; the backend reduces (with for_each_dense_subset).
inline void check_norm_args(at::TensorList tensors, double norm_type, c10::DeviceType device) {
  check_norm_type(norm_type);
  check_floating_list(tensors, "tensors", device);
  check_norm_defined(tensors, norm_type);
}

inline void check_scale_args(at::TensorList tensors, const at::Tensor& scale, c10::DeviceType device) {
  check_floating_list(tensors, "tensors", device);
  check_writable(tensors, "tensors");
  TORCH_CHECK(scale.numel() == 1, "scale must hold one element, got shape ", scale.sizes());
}

// torch's clipping coefficient, computed in the total's dtype where the total is:
// min(1, max_norm / (total + 1e-6)).
inline at::Tensor clip_coefficient(const at::Tensor& total, double max_norm) {
  return at::clamp_max(at::mul(at::reciprocal(at::add(total, 1e-6)), max_norm), 1.0);
}

// clip_grad_norm_: total = norm(grads, norm_type, error_if_nonfinite) (raising before anything is
// written), then scale(grads, clip_coefficient(total, max_norm)).
template <typename Norm, typename Scale>
at::Tensor clip_grad_norm_host(at::TensorList grads, double max_norm, double norm_type, bool error_if_nonfinite,
                               c10::DeviceType device, const Norm& norm, const Scale& scale) {
  check_norm_type(norm_type);
  check_floating_list(grads, "grads", device);
  check_writable(grads, "grads");
  at::Tensor total = norm(grads, norm_type, error_if_nonfinite);
  if (!grads.empty()) {
    scale(grads, clip_coefficient(total, max_norm));
  }
  return total;
}

// clip_grad_value_: clamp(dtype, grads) per dtype group clamps to [-clip_value, clip_value]; a NaN
// clip_value makes every gradient NaN, as torch.clamp_ with NaN bounds does.
template <typename Clamp>
void clip_grad_value_host(at::TensorList grads, double clip_value, c10::DeviceType device, const Clamp& clamp) {
  check_floating_list(grads, "grads", device);
  check_writable(grads, "grads");
  check_clip_value(grads, clip_value);
  if (std::isnan(clip_value)) {
    for (const at::Tensor& g : grads) {
      g.fill_(NAN);
    }
    return;
  }
  for_each_dense_group({grads}, [&](at::ScalarType dtype, const std::vector<at::Tensor>& g,
                                    const std::vector<std::vector<at::Tensor>>&) { clamp(dtype, g); });
}

// pre_step_'s checks, everything it refuses (fused_optim.checks.check_pre_step_args, the same in
// Python, runs alone on the Python paths that write in several calls and must refuse before the first).
inline void check_pre_step_args(at::TensorList params, at::TensorList grads, double l1, double l2,
                                std::optional<double> max_norm, double norm_type, std::optional<double> clip_value,
                                c10::DeviceType device) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_norm_type(norm_type);
  TORCH_CHECK_VALUE(!(max_norm && clip_value), "pre_step_: pass max_norm or clip_value, not both");
  check_floating_list(params, "params", device);
  check_paired_lists(params, "params", grads, "grads");
  check_norm_defined(grads, norm_type);
  if (clip_value) {
    check_clip_value(grads, *clip_value);
  }
  check_writable(grads, "grads");
  check_same_or_disjoint(grads, "grads", params, "params");
}

// pre_step_: equal to its sequence of ops: l1l2_grad_ (skipped when l1 = l2 = 0), the total norm of
// the resulting gradients (returned), then clip_grad_norm_'s scaling by that total (max_norm) or
// clip_grad_value_'s clamp (clip_value, at most one of the two). With error_if_nonfinite a nan or
// inf total raises before anything is written. The backend's callables: fused(write) runs the
// penalty and the norm in one pass, writing the gradients when `write`, and returns the total
// (used when no two positions share memory, the usual case); add() is l1l2_grad_, norm(error)
// multi_tensor_norm's total, scale(coefficient) multi_tensor_scale_, clamp(dtype, grads) the clamp
// of one dtype group.
template <typename Fused, typename Add, typename Norm, typename Scale, typename Clamp>
at::Tensor pre_step_host(at::TensorList params, at::TensorList grads, double l1, double l2, std::optional<double> max_norm,
                         double norm_type, std::optional<double> clip_value, bool error_if_nonfinite,
                         c10::DeviceType device, const Fused& fused, const Add& add, const Norm& norm,
                         const Scale& scale, const Clamp& clamp) {
  check_pre_step_args(params, grads, l1, l2, max_norm, norm_type, clip_value, device);
  at::Tensor total;
  if (l1 == 0.0 && l2 == 0.0) {
    total = norm(error_if_nonfinite);  // raises before anything is written
  } else if (!positions_share_memory({grads, params}, 1)) {
    total = fused(/*write=*/!error_if_nonfinite);
    if (error_if_nonfinite) {
      check_finite_norm(total, norm_type);
      add();
    }
  } else {
    // Positions share memory: the ops in sequence, on a snapshot to restore when the total is refused.
    std::vector<at::Tensor> saved;
    if (error_if_nonfinite) {
      for (const at::Tensor& g : grads) {
        saved.push_back(g.clone());
      }
    }
    add();
    total = norm(false);
    if (error_if_nonfinite && !std::isfinite(total.item<double>())) {
      for (size_t i = 0; i < grads.size(); ++i) {
        grads[i].copy_(saved[i]);
      }
      check_finite_norm(total, norm_type);
    }
  }
  if (max_norm && !grads.empty()) {
    scale(clip_coefficient(total, *max_norm));
  } else if (clip_value) {
    clip_grad_value_host(grads, *clip_value, device, clamp);
  }
  return total;
}

// multi_tensor_weighted_sum_: sum(dtype, out, inputs) per dtype group writes
// out = sum_m weights[m] * inputs[m].
template <typename Sum>
void weighted_sum_host(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out, c10::DeviceType device, const Sum& sum) {
  check_weighted_sum_args(inputs, weights, out, device);
  for_each_dense_group(weighted_sum_lists(inputs, weights, out), sum);
}

// multi_tensor_lerp_: lerp(dtype, self, end, host_weight) per dtype group, host_weight the
// weight's value when it is on the CPU, nullopt when it stays in device memory.
template <typename Lerp>
void lerp_host(at::TensorList self, at::TensorList end, const at::Tensor& weight, c10::DeviceType device, const Lerp& lerp) {
  check_lerp_lists(self, end, device);
  // With no tensors, there is no device for the weight to match.
  const std::optional<double> host_weight =
      check_weight_tensor(weight, "weight", self.empty() ? weight.device() : self[0].device());
  for_each_dense_group({self, end}, [&](at::ScalarType dtype, const std::vector<at::Tensor>& s,
                                        const std::vector<std::vector<at::Tensor>>& read) { lerp(dtype, s, read[0], host_weight); });
}

} // namespace fused_optim
