// How the CUDA norm kernels (csrc/cuda/clip_grad.cu, pre_step.cu, norm_from_chunks.cuh) reduce, as
// host-device code that the kernels call: what an element adds to an accumulator, how two
// accumulators combine, and what a thread folds. block_order_reduce and block_order_combine run a
// block's order on the host with the same functions (csrc/testing.cpp exposes them), so the CPU
// tests check it against its documentation and the CUDA tests check the kernels against it, bit for
// bit.
//
// The order, for one block of kThreads threads over n values:
//  1. thread t folds values t, t + kThreads, t + 2 kThreads, ... in turn, from the identity:
//     elements into an accumulator of their op-math type T (fp32 for fp16, bf16 and fp32, fp64 for
//     fp64) with accumulate(), fp64 accumulators (chunk partials, per-tensor terms) with combine();
//  2. the thread's accumulator is converted to fp64;
//  3. the threads' values are combined in fp64 in a tree: at stride s = kThreads / 2, kThreads / 4,
//     ..., 1, thread t < s folds in thread t + s's value.
// A block of the element kernels covers one chunk, so a thread folds at most kThreadRun elements
// in T: fp64 work is one conversion per kThreadRun elements and the tree, and an fp16/bf16/fp32
// norm stays memory-bound on GPUs whose fp64 runs at 1/64 of the fp32 rate.
#pragma once

#include "common/launch_plan.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fused_optim::cuda {

// Elements a thread folds in the op-math type before its value goes to fp64. 128 fp32 terms, as
// the CPU's lanes sum 64 to 128 (kReduceBlock over the vector lanes) before flushing: the run's
// rounding error is at most 128 ulp of its sum (fp64 above it), and a sum of squares overflows fp32
// only when elements exceed 3.4e38 / 128 in square, |x| > 1.6e18.
constexpr int64_t kThreadRun = kChunkSize / kBlockSize;
static_assert(kThreadRun == 128);

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

// acc + v * v with the product and the sum each rounded: never one fused multiply-add, whatever
// nvcc's -fmad (the host build has -ffp-contract=off), so that device and host agree bit for bit.
// The other sums add no product: nothing there to fuse.
template <typename T>
C10_HOST_DEVICE inline T add_square(T acc, T v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fadd_rn(acc, __fmul_rn(v, v));
  } else {
    return __dadd_rn(acc, __dmul_rn(v, v));
  }
#else
  return acc + v * v;
#endif
}

template <typename T = double>
C10_HOST_DEVICE inline T identity(Kind kind) {
  return kind == kMin ? static_cast<T>(INFINITY) : T(0);
}

// NaN-propagating combine of two accumulators (a != a: NaN, on the host and the device alike).
template <typename T>
C10_HOST_DEVICE inline T combine(Kind kind, T a, T b) {
  if (kind == kMax) return (a != a || a > b) ? a : b;
  if (kind == kMin) return (a != a || a < b) ? a : b;
  return a + b;
}

// The accumulator after element v, in v's op-math type T: acc + x * x unfused for squares. For
// kSumPow the term is the device's pow on the GPU and the host's in the replica, which may differ
// by an ulp; every other kind is exactly the same arithmetic on both.
template <typename T>
C10_HOST_DEVICE inline T accumulate(Kind kind, T acc, T v, T p) {
  const T a = std::fabs(v);
  switch (kind) {
    case kSumSquares: return add_square(acc, v);
    case kSumPow: return acc + std::pow(a, p);
    case kCount: return acc + static_cast<T>(v != T(0));
    default: return combine(kind, acc, a);  // kSumAbs, kMax, kMin
  }
}

// Steps 1 and 2 for elements: element(i) (a T) for i = first, first + stride, ... < end folded with
// accumulate, the result in fp64.
template <typename T, typename Element>
C10_HOST_DEVICE inline double fold_elements(Kind kind, T p, int64_t first, int64_t end, int64_t stride, const Element& element) {
  T acc = identity<T>(kind);
  for (int64_t i = first; i < end; i += stride) {
    acc = accumulate(kind, acc, element(i), p);
  }
  return static_cast<double>(acc);
}

// Step 1 for fp64 accumulators: value(i) for i = first, first + stride, ... < end folded with combine.
template <typename Value>
C10_HOST_DEVICE inline double fold_accumulators(Kind kind, int64_t first, int64_t end, int64_t stride, const Value& value) {
  double acc = identity(kind);
  for (int64_t i = first; i < end; i += stride) {
    acc = combine(kind, acc, value(i));
  }
  return acc;
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

// Step 3 on the host (the kernels run it in shared memory): the tree over the threads' values.
template <int kThreads>
double tree_combine(Kind kind, std::vector<double> acc) {
  for (int s = kThreads / 2; s > 0; s /= 2) {
    for (int t = 0; t < s; ++t) {
      acc[t] = combine(kind, acc[t], acc[t + s]);
    }
  }
  return acc[0];
}

// A block's reduction of n elements x (op-math type T) into an fp64 accumulator, on the host.
template <int kThreads, typename T>
double block_order_reduce(Kind kind, const T* x, int64_t n, T p) {
  std::vector<double> acc(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    acc[t] = fold_elements(kind, p, t, n, kThreads, [&](int64_t i) { return x[i]; });
  }
  return tree_combine<kThreads>(kind, std::move(acc));
}

// A block's combine of n fp64 accumulators, on the host.
template <int kThreads>
double block_order_combine(Kind kind, const double* values, int64_t n) {
  std::vector<double> acc(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    acc[t] = fold_accumulators(kind, t, n, kThreads, [&](int64_t i) { return values[i]; });
  }
  return tree_combine<kThreads>(kind, std::move(acc));
}

} // namespace fused_optim::cuda
