// The per-CPU-capability inner kernels (csrc/cpu/kernels/*.cpp, compiled once per capability),
// reached through ATen DispatchStubs that pick the best copy for the running CPU.
//
// Every kernel takes tensors already checked, grouped to one dtype, and dense (see as_dense).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>

#include <array>
#include <vector>

namespace fused_optim {

using at::native::DispatchStub;

// l1l2_penalty: {sum |x|, sum x^2} over all elements of tensors.
using l1l2_sums_fn = std::array<double, 2> (*)(const std::vector<at::Tensor>& tensors);
DECLARE_DISPATCH(l1l2_sums_fn, l1l2_sums_stub)

// l1l2 gradient: outs[i] = (accumulate ? outs[i] : 0) + a * sign(params[i]) + b * params[i], where
// params[i] and outs[i] share one dense layout.
using l1l2_grad_fn = void (*)(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs, double a, double b,
    bool accumulate);
DECLARE_DISPATCH(l1l2_grad_fn, l1l2_grad_stub)

} // namespace fused_optim
