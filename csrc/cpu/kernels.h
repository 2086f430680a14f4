// The per-CPU-capability inner kernels (csrc/cpu/kernels/*.cpp, compiled once per capability),
// reached through ATen DispatchStubs that pick the best copy for the running CPU.
//
// Every kernel takes tensors already checked, grouped to one dtype, and dense (see as_dense).
#pragma once

#include "common/dropout.h"

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>

#include <array>
#include <vector>

namespace fused_optim {

using at::native::DispatchStub;

// regularization (kernels/regularization.cpp).
// l1l2_penalty: {sum |x|, sum x^2} over all elements of tensors.
using l1l2_sums_fn = std::array<double, 2> (*)(const std::vector<at::Tensor>& tensors);
DECLARE_DISPATCH(l1l2_sums_fn, l1l2_sums_stub)

// l1l2 gradient: outs[i] = (accumulate ? outs[i] : 0) + a * sign(params[i]) + b * params[i], where
// params[i] and outs[i] share one dense layout.
using l1l2_grad_fn = void (*)(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs, double a, double b,
    bool accumulate);
DECLARE_DISPATCH(l1l2_grad_fn, l1l2_grad_stub)

// clip_grad (kernels/clip_grad.cpp).
// Multi-tensor norms. Each kernel folds every element into a per-tensor accumulator:
// sum |x|^p (kSum*), count of x != 0 (kCount), max |x| (kMax) or min |x| (kMin).
enum class NormKind { kSumAbs, kSumSquares, kSumPow, kCount, kMax, kMin };

// per_tensor_acc[i] = the accumulator of tensors[i]; combined in chunk order, so deterministic.
using norm_fn = void (*)(const std::vector<at::Tensor>& tensors, NormKind kind, double p, double* per_tensor_acc);
DECLARE_DISPATCH(norm_fn, norm_stub)

// tensors[i] *= scale, computed in the op-math type.
using scale_fn = void (*)(const std::vector<at::Tensor>& tensors, double scale);
DECLARE_DISPATCH(scale_fn, scale_stub)

// tensors[i] = clamp(tensors[i], -clip_value, clip_value), NaN kept, in one pass.
using clamp_fn = void (*)(const std::vector<at::Tensor>& tensors, double clip_value);
DECLARE_DISPATCH(clamp_fn, clamp_stub)

// pre_step (kernels/pre_step.cpp).
// The pre-step's pass: x = grads[i] + a * sign(params[i]) + b * params[i], rounded to the dtype,
// written into grads[i] when `write`, and folded into per_tensor_acc[i] as norm_fn folds x (the
// same order: the norm equals norm_fn's over the written gradients, bit for bit).
using penalty_norm_fn = void (*)(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double a,
                                 double b, bool write, NormKind kind, double p, double* per_tensor_acc);
DECLARE_DISPATCH(penalty_norm_fn, penalty_norm_stub)

// averaging (kernels/averaging.cpp).
// Weighted sum of K lists: outs[i] = sum_m weights[m] * inputs[m][i], read once each, written
// once; inputs[m][i] shares outs[i]'s dense layout (it may be outs[i] itself).
using weighted_sum_fn = void (*)(const std::vector<std::vector<at::Tensor>>& inputs, const std::vector<double>& weights,
                                 const std::vector<at::Tensor>& outs);
DECLARE_DISPATCH(weighted_sum_fn, weighted_sum_stub)

// selfs[i] = lerp(selfs[i], ends[i], weight) with torch.lerp's formula, in place (EMA and SWA).
using lerp_fn = void (*)(const std::vector<at::Tensor>& selfs, const std::vector<at::Tensor>& ends, double weight);
DECLARE_DISPATCH(lerp_fn, lerp_stub)

// dropout (kernels/dropout.cpp; structured_dropout has no kernels of its own: it runs on these).
// Dropout: the stream is defined in common/dropout.h.
// out = in * (kept ? scale : 0) over contiguous in/out (which may alias) of numel elements.
using dropout_fn = void (*)(const at::Tensor& in, const at::Tensor& out, uint64_t threshold, double scale,
                            uint64_t seed, uint64_t offset);
DECLARE_DISPATCH(dropout_fn, dropout_stub)

// Bit i % 8 of mask[i / 8] = element i kept, for numel elements.
using dropout_mask_fn = void (*)(uint8_t* mask, int64_t numel, uint64_t threshold, uint64_t seed, uint64_t offset);
DECLARE_DISPATCH(dropout_mask_fn, dropout_mask_stub)

} // namespace fused_optim
