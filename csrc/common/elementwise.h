// Elementwise formulas shared by the CPU and CUDA kernels, so that the two cannot differ.
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>

namespace fused_optim {

// The arithmetic contract (docs/numerics.md, "Arithmetic"): a product and a sum are each rounded (no FMA
// contraction: -ffp-contract=off for the host, -fmad=false for nvcc, see setup.py) except where a
// formula calls fma_rn, which rounds a * b + c once on every path.
template <typename T>
C10_HOST_DEVICE inline T fma_rn(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// torch.lerp(start, end, w) as torch computes it on AVX2 CPUs and on CUDA (at::native::lerp with
// the multiply-add fused), w already in the op-math type T: start + w * (end - start) for |w| < 0.5,
// else end + (w - 1) * (end - start), each one fused multiply-add.
template <typename T>
C10_HOST_DEVICE inline bool lerp_weight_is_small(T w) {
  return (w < T(0) ? -w : w) < T(0.5);
}

template <typename T>
C10_HOST_DEVICE inline T lerp_like_torch(T start, T end, T w) {
  const bool small = lerp_weight_is_small(w);
  return fma_rn(small ? w : w - T(1), end - start, small ? start : end);
}

// l1l2_grad_'s element: (g + a * sign(w)) + b * w, each operation rounded in the op-math type
// (a * sign(w) is exact). The backward uses it with g = 0.
template <typename T>
C10_HOST_DEVICE inline T penalty_grad(T g, T w, T a, T b) {
  const T sign = static_cast<T>((w > T(0)) - (w < T(0)));
  return g + a * sign + b * w;
}

// torch.clamp(v, lo, hi): min(max(v, lo), hi), so hi when lo > hi (a negative clip_value gives
// every element -|clip_value|), and a NaN element stays NaN. NaN bounds never reach the kernels:
// torch fills the tensor with NaN then, and so do the ops.
template <typename T>
C10_HOST_DEVICE inline T clamp_like_torch(T v, T lo, T hi) {
  if (v != v) {
    return v;
  }
  const T at_least_lo = v < lo ? lo : v;
  return at_least_lo > hi ? hi : at_least_lo;
}

// A sum of non-negative terms (|x|, x^2, |x|^p), accumulated in fp64, as a sum in the op-math
// type holds it: inf beyond fp32's range when that type is fp32 (fp16/bf16/fp32 tensors), as in
// torch, which sums such tensors in fp32. The kernels add short op-math runs and combine them in
// fp64, so without this rule whether a huge sum overflows would depend on where it sits.
C10_HOST_DEVICE inline double sum_in_opmath_range(double sum, bool opmath_is_fp32) {
  return opmath_is_fp32 && sum > static_cast<double>(FLT_MAX) ? static_cast<double>(INFINITY) : sum;
}

// The penalty from its two sums. A zero coefficient contributes nothing, even where its sum
// overflowed to inf (the seed's formula would give 0 * inf = nan for l2 = 0 and huge weights).
C10_HOST_DEVICE inline double penalty_from_sums(double l1, double l2, double abs_sum, double square_sum) {
  return (l1 == 0.0 ? 0.0 : l1 * abs_sum) + (l2 == 0.0 ? 0.0 : l2 * square_sum);
}

} // namespace fused_optim
