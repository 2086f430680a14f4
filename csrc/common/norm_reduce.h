// The CPU norms' accumulators and per-tensor reduction frame, shared by the norm kernels
// (csrc/cpu/kernels/clip_grad.cpp) and the pre-step's gradient-and-norm pass
// (csrc/cpu/kernels/pre_step.cpp), which must fold elements in the same order: its norm equals the
// norm kernel's over the written gradients, bit for bit.
#pragma once

#include "common/chunking.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

// Compiled into every per-capability kernel copy: the inline namespace keeps the copies apart.
namespace fused_optim {
inline namespace CPU_CAPABILITY {

// max / min that return NaN when either side is NaN, as torch's reductions do.
inline double nan_max(double a, double b) {
  return (std::isnan(a) || a > b) ? a : b;
}
inline double nan_min(double a, double b) {
  return (std::isnan(a) || a < b) ? a : b;
}

// One accumulator kind: how an element enters it (for vectors and scalars), and how two
// accumulators combine (in fp64).
template <NormKind kKind>
struct Acc {
  static constexpr bool kIsSum = kKind != NormKind::kMax && kKind != NormKind::kMin;
  static constexpr double identity() {
    return kKind == NormKind::kMin ? std::numeric_limits<double>::infinity() : 0.0;
  }
  template <typename V>  // V: a Vectorized or an op-math scalar
  static V add(const V& acc, const V& x, const V& p) {
    if constexpr (std::is_floating_point_v<V>) {
      const V a = std::abs(x);
      switch (kKind) {
        case NormKind::kSumAbs: return acc + a;
        case NormKind::kSumSquares: return acc + x * x;
        case NormKind::kSumPow: return acc + std::pow(a, p);
        case NormKind::kCount: return acc + V(x != V(0));
        case NormKind::kMax: return static_cast<V>(nan_max(acc, a));
        case NormKind::kMin: return static_cast<V>(nan_min(acc, a));
      }
    } else {
      switch (kKind) {
        case NormKind::kSumAbs: return acc + x.abs();
        case NormKind::kSumSquares: return acc + x * x;  // unfused, as the scalar tail
        case NormKind::kSumPow: return acc + x.abs().pow(p);
        case NormKind::kCount: return acc + x.ne(V(0));
        case NormKind::kMax: return at::vec::maximum(acc, x.abs());
        case NormKind::kMin: return at::vec::minimum(acc, x.abs());
      }
    }
    return acc;
  }
  static double combine(double a, double b) {
    if constexpr (kKind == NormKind::kMax) {
      return nan_max(a, b);
    } else if constexpr (kKind == NormKind::kMin) {
      return nan_min(a, b);
    } else {
      return a + b;
    }
  }
  template <typename T>
  static double fold_lanes(const at::vec::Vectorized<T>& v) {
    if constexpr (kIsSum) {
      return sum_lanes(v);
    } else {
      alignas(64) T lanes[at::vec::Vectorized<T>::size()];
      v.store(lanes);
      double r = identity();
      for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) {
        r = combine(r, static_cast<double>(lanes[k]));
      }
      return r;
    }
  }
};

// The reductions' frame: each piece of each chunk reduced in blocks of kReduceBlock elements by
// block(t, start, n, vacc, sacc) into kAccumulators op-math vectors and a scalar, flushed into fp64
// after each block; the pieces' partials then folded per tensor in chunk order, so the result does
// not depend on the threads.
template <typename A, typename scalar_t, typename Block>
void reduce_per_tensor(const std::vector<at::Tensor>& tensors, double* per_tensor_acc, const Block& block) {
  using T = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  const ChunkPlan plan(tensors);
  std::vector<std::vector<std::pair<int64_t, double>>> pieces(plan.num_chunks());
  plan.parallel_for_each_chunk([&](int64_t c) {
    plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
      double acc = A::identity();
      for (int64_t off = 0; off < len; off += kReduceBlock) {
        const Vec init(static_cast<T>(A::identity()));
        Vec vacc[kAccumulators] = {init, init, init, init};
        T sacc = static_cast<T>(A::identity());
        block(t, begin + off, std::min(kReduceBlock, len - off), vacc, sacc);
        for (int k = 0; k < kAccumulators; ++k) {
          acc = A::combine(acc, A::fold_lanes(vacc[k]));
        }
        acc = A::combine(acc, static_cast<double>(sacc));
      }
      pieces[c].emplace_back(t, acc);
    });
  });
  std::fill(per_tensor_acc, per_tensor_acc + tensors.size(), A::identity());
  for (const auto& chunk : pieces) {
    for (const auto& [t, acc] : chunk) {
      per_tensor_acc[t] = A::combine(per_tensor_acc[t], acc);
    }
  }
}

} // namespace CPU_CAPABILITY
} // namespace fused_optim
