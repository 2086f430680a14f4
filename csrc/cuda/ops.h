// CUDA kernels that another op's kernel calls directly (below the dispatcher: the caller has
// already checked its arguments and bumps its own versions).
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_optim::cuda {

// l1l2_grad_ (csrc/cuda/regularization.cu): grads += l1 * sign(params) + 2 * l2 * params.
void l1l2_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2);

} // namespace fused_optim::cuda
