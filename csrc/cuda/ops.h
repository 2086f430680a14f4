// CUDA kernels and host helpers of one family that another family's op calls directly (below the
// dispatcher: the caller has already checked its arguments and bumps its own versions), as
// csrc/cpu/ops.h for the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace fused_optim::cuda {

// l1l2_grad_ (csrc/cuda/regularization.cu): grads += l1 * sign(params) + 2 * l2 * params.
void l1l2_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2);

// clip_grad (csrc/cuda/clip_grad.cu), which pre_step_ (csrc/cuda/pre_step.cu) runs on:
// multi_tensor_norm: (total norm, per-tensor norms, empty unless per_tensor).
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(
    at::TensorList tensors, double norm_type, bool per_tensor, bool error_if_nonfinite);
// Scales every tensor by `scale`, a one-element tensor on the tensors' device, without reading it
// on the host; nothing is written when it is 1.
void scale_by(at::TensorList tensors, const at::Tensor& scale);
// The clamp of one dtype group of dense gradients (clip_grad_value_'s and pre_step_'s).
void clamp_group(at::ScalarType dtype, const std::vector<at::Tensor>& g, double clip_value);

// dropout (csrc/cuda/dropout.cu), which the structured forms (csrc/cuda/structured_dropout.cu) run on:
// (seed, offset) as the kernel gets them: from device memory when `device` is set.
struct SeedOffset {
  const int64_t* device;
  uint64_t seed, offset;
};
// The kernel's view of seed_offset (checked: int64, 2 elements, on the CPU or on input's device;
// a CPU pair is refused under CUDA graph capture); `holder` keeps a device copy alive until the launch.
SeedOffset seed_offset_arg(const at::Tensor& seed_offset, const at::Tensor& input, at::Tensor& holder);
// Writes dropout(input) with probability p into out; both contiguous, possibly the same tensor.
void run_dropout(const at::Tensor& input, const at::Tensor& out, double p, const at::Tensor& seed_offset);

} // namespace fused_optim::cuda
