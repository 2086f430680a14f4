// CPU ops and host helpers of one family that another family's op calls directly (below the
// dispatcher: the caller has already checked its arguments and bumps its own versions), as
// csrc/cuda/ops.h for CUDA.
#pragma once

#include "cpu/kernels.h"

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace fused_optim::cpu {

// l1l2_grad_ (csrc/cpu/regularization.cpp): grads += l1 * sign(params) + 2 * l2 * params.
void l1l2_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2);

// clip_grad (csrc/cpu/clip_grad.cpp), which pre_step_ (csrc/cpu/pre_step.cpp) runs on:
// The accumulator kind of a norm order p (2 -> kSumSquares, inf -> kMax, ...).
NormKind norm_kind(double p);
// The norm of order p from its accumulator.
double norm_from_acc(double acc, NormKind kind, double p);
// The total of per-tensor norms as torch.nn.utils.get_total_norm defines it, for norms of dtype.
double total_norm(const std::vector<double>& norms, NormKind kind, double p, at::ScalarType dtype);
// multi_tensor_norm: (total norm, per-tensor norms, empty unless per_tensor).
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(
    at::TensorList tensors, double norm_type, bool per_tensor, bool error_if_nonfinite);
// Multiplies every tensor by scale, writing nothing when scale is 1.
void scale_in_place(at::TensorList tensors, double scale);

// dropout (csrc/cpu/dropout.cpp), which the structured forms (csrc/cpu/structured_dropout.cpp) run
// on: writes dropout(input) with probability p and seed_offset (a CPU int64 tensor of 2 elements,
// checked even when p keeps everything) into out; both contiguous, possibly the same tensor.
void run_dropout(const at::Tensor& input, const at::Tensor& out, double p, const at::Tensor& seed_offset);

} // namespace fused_optim::cpu
