// CPU ops that another op's kernel calls directly (below the dispatcher: the caller has already
// checked its arguments and bumps its own versions), as csrc/cuda/ops.h for CUDA.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_optim::cpu {

// l1l2_grad_ (csrc/cpu/regularization.cpp): grads += l1 * sign(params) + 2 * l2 * params.
void l1l2_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2);

} // namespace fused_optim::cpu
