// How the CUDA norm kernels (csrc/cuda/clip_grad.cu) combine what they reduce, as host-device
// code: the accumulator of each norm order, and the fixed order in which a block combines values.
// block_order_combine runs that order on the host (csrc/testing.cpp exposes it), so the CPU tests
// check it against its documentation and the CUDA tests check the kernels against it, bit for bit.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fused_optim::cuda {

// Accumulator kinds, as on the CPU: sum |x|, sum x^2, sum |x|^p, count x != 0, max |x|, min |x|.
enum Kind : int { kSumAbs, kSumSquares, kSumPow, kCount, kMax, kMin };

inline Kind norm_kind(double p) {
  if (p == 1.0) return kSumAbs;
  if (p == 2.0) return kSumSquares;
  if (p == 0.0) return kCount;
  if (p == INFINITY) return kMax;
  if (p == -INFINITY) return kMin;
  return kSumPow;
}

C10_HOST_DEVICE inline double identity(Kind kind) {
  return kind == kMin ? INFINITY : 0.0;
}

// NaN-propagating combine of two accumulators (a != a: NaN, on the host and the device alike).
C10_HOST_DEVICE inline double combine(Kind kind, double a, double b) {
  if (kind == kMax) return (a != a || a > b) ? a : b;
  if (kind == kMin) return (a != a || a < b) ? a : b;
  return a + b;
}

// The kind that combines per-tensor terms into the total: torch's total for p = 0 counts the
// tensors with a non-zero element, a sum.
C10_HOST_DEVICE inline Kind total_kind(Kind kind) {
  return kind == kCount ? kSumAbs : kind;
}

// The norm of order p from its accumulator.
C10_HOST_DEVICE inline double norm_from_acc(Kind kind, double acc, double p) {
  if (kind == kSumSquares) return sqrt(acc);
  if (kind == kSumPow) return pow(acc, 1.0 / p);
  return acc;
}

// What a tensor's norm adds to the total as torch defines it (the norm of the per-tensor norms).
C10_HOST_DEVICE inline double total_term(Kind kind, double norm, double p) {
  if (kind == kSumSquares) return norm * norm;
  if (kind == kSumPow) return pow(norm, p);
  if (kind == kCount) return norm != 0.0;
  return norm;
}

// The order in which a block of kThreads threads combines n values: thread t folds values t,
// t + kThreads, t + 2 kThreads, ... in turn, starting from the identity; then the threads' results
// are combined in a tree: at stride s = kThreads / 2, kThreads / 4, ..., 1, thread t < s folds in
// thread t + s's result. The CUDA kernels do this in parallel; this runs it on the host.
template <int kThreads>
double block_order_combine(Kind kind, const double* values, int64_t n) {
  std::vector<double> acc(kThreads, identity(kind));
  for (int t = 0; t < kThreads; ++t) {
    for (int64_t i = t; i < n; i += kThreads) {
      acc[t] = combine(kind, acc[t], values[i]);
    }
  }
  for (int s = kThreads / 2; s > 0; s /= 2) {
    for (int t = 0; t < s; ++t) {
      acc[t] = combine(kind, acc[t], acc[t + s]);
    }
  }
  return acc[0];
}

} // namespace fused_optim::cuda
