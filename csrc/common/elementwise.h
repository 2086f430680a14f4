// Elementwise formulas shared by the CPU and CUDA kernels, so that the two cannot differ.
#pragma once

#include <c10/macros/Macros.h>

namespace fused_optim {

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

// The penalty from its two sums. A zero coefficient contributes nothing, even where its sum
// overflowed to inf (the seed's formula would give 0 * inf = nan for l2 = 0 and huge weights).
C10_HOST_DEVICE inline double penalty_from_sums(double l1, double l2, double abs_sum, double square_sum) {
  return (l1 == 0.0 ? 0.0 : l1 * abs_sum) + (l2 == 0.0 ? 0.0 : l2 * square_sum);
}

} // namespace fused_optim
