// Inner loops of multi-tensor norms, scaling and clamping, compiled once per CPU capability.
#include "common/chunking.h"
#include "common/elementwise.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <utility>

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

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

template <NormKind kKind, typename scalar_t>
void norm_accumulate(const std::vector<at::Tensor>& tensors, double p, double* per_tensor_acc) {
  using A = Acc<kKind>;
  using T = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  const Vec p_vec(static_cast<T>(p));
  const T p_scalar = static_cast<T>(p);
  reduce_per_tensor<A, scalar_t>(tensors, per_tensor_acc, [&](int64_t t, int64_t start, int64_t n, Vec* vacc, T& sacc) {
    for_each_vec(
        tensors[t].const_data_ptr<scalar_t>() + start, n, [&](int k, const Vec& v) { vacc[k] = A::add(vacc[k], v, p_vec); },
        [&](T v) { sacc = A::add(sacc, v, p_scalar); });
  });
}

// norm_accumulate's reduction over x = g + a * sign(w) + b * w (l1l2_grad_'s formula and rounding),
// written back when kWrite.
template <NormKind kKind, bool kWrite, typename scalar_t>
void penalty_norm_accumulate(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double a,
                             double b, double p, double* per_tensor_acc) {
  using A = Acc<kKind>;
  using T = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t step = vec_step<scalar_t>();
  const T a_ = static_cast<T>(a), b_ = static_cast<T>(b);
  const auto penalty = [&](auto w, auto g) {
    using V = decltype(w);
    return g + V(a_) * sign(w) + V(b_) * w;
  };
  const Vec p_vec(static_cast<T>(p));
  const T p_scalar = static_cast<T>(p);
  reduce_per_tensor<A, scalar_t>(grads, per_tensor_acc, [&](int64_t t, int64_t start, int64_t n, Vec* vacc, T& sacc) {
    const scalar_t* w = params[t].const_data_ptr<scalar_t>() + start;
    scalar_t* g = grads[t].data_ptr<scalar_t>() + start;
    // The norm's dealing of vectors to accumulators (for_each_vec's), so its fold order.
    int64_t i = for_each_vec_offset<scalar_t>(n, [&](int k, int64_t j) {
      if constexpr (kReducedFloat<scalar_t>) {
        Vec w_lo, w_hi, g_lo, g_hi;
        at::vec::load_to_float(w + j, w_lo, w_hi);
        at::vec::load_to_float(g + j, g_lo, g_hi);
        // The norm is of the rounded gradients, as a norm over the written ones would be.
        alignas(64) scalar_t rounded[step];
        scalar_t* dst = kWrite ? g + j : rounded;
        at::vec::convert_from_float<scalar_t>(penalty(w_lo, g_lo), penalty(w_hi, g_hi)).store(dst);
        at::vec::load_to_float(dst, g_lo, g_hi);
        vacc[k] = A::add(A::add(vacc[k], g_lo, p_vec), g_hi, p_vec);
      } else {
        const Vec x = penalty(Vec::loadu(w + j), Vec::loadu(g + j));
        if constexpr (kWrite) {
          x.store(g + j);
        }
        vacc[k] = A::add(vacc[k], x, p_vec);
      }
    });
    for (; i < n; ++i) {
      const scalar_t x = static_cast<scalar_t>(penalty(static_cast<T>(w[i]), static_cast<T>(g[i])));
      if constexpr (kWrite) {
        g[i] = x;
      }
      sacc = A::add(sacc, static_cast<T>(x), p_scalar);
    }
  });
}

template <NormKind kKind, typename scalar_t>
void penalty_norm_write(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double a, double b,
                        bool write, double p, double* out) {
  if (write) {
    penalty_norm_accumulate<kKind, true, scalar_t>(params, grads, a, b, p, out);
  } else {
    penalty_norm_accumulate<kKind, false, scalar_t>(params, grads, a, b, p, out);
  }
}

void penalty_norm_kernel(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double a,
                         double b, bool write, NormKind kind, double p, double* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "pre_step_", [&] {
    switch (kind) {
      case NormKind::kSumAbs: return penalty_norm_write<NormKind::kSumAbs, scalar_t>(params, grads, a, b, write, p, out);
      case NormKind::kSumSquares: return penalty_norm_write<NormKind::kSumSquares, scalar_t>(params, grads, a, b, write, p, out);
      case NormKind::kSumPow: return penalty_norm_write<NormKind::kSumPow, scalar_t>(params, grads, a, b, write, p, out);
      case NormKind::kCount: return penalty_norm_write<NormKind::kCount, scalar_t>(params, grads, a, b, write, p, out);
      case NormKind::kMax: return penalty_norm_write<NormKind::kMax, scalar_t>(params, grads, a, b, write, p, out);
      case NormKind::kMin: return penalty_norm_write<NormKind::kMin, scalar_t>(params, grads, a, b, write, p, out);
    }
  });
}

template <typename scalar_t>
void norm_dispatch_kind(const std::vector<at::Tensor>& tensors, NormKind kind, double p, double* out) {
  switch (kind) {
    case NormKind::kSumAbs: return norm_accumulate<NormKind::kSumAbs, scalar_t>(tensors, p, out);
    case NormKind::kSumSquares: return norm_accumulate<NormKind::kSumSquares, scalar_t>(tensors, p, out);
    case NormKind::kSumPow: return norm_accumulate<NormKind::kSumPow, scalar_t>(tensors, p, out);
    case NormKind::kCount: return norm_accumulate<NormKind::kCount, scalar_t>(tensors, p, out);
    case NormKind::kMax: return norm_accumulate<NormKind::kMax, scalar_t>(tensors, p, out);
    case NormKind::kMin: return norm_accumulate<NormKind::kMin, scalar_t>(tensors, p, out);
  }
}

void norm_kernel(const std::vector<at::Tensor>& tensors, NormKind kind, double p, double* per_tensor_acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_norm", [&] {
    norm_dispatch_kind<scalar_t>(tensors, kind, p, per_tensor_acc);
  });
}

// Applies op (written once for vectors and scalars) to every element of every tensor, in place.
template <typename scalar_t, typename Op>
void update_in_place(const std::vector<at::Tensor>& tensors, const Op& op) {
  const ChunkPlan plan(tensors);
  plan.parallel_for_each_chunk([&](int64_t c) {
    plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
      scalar_t* x = tensors[t].mutable_data_ptr<scalar_t>() + begin;
      update_each<false>(x, x, len, [&](auto v, auto) { return op(v); });
    });
  });
}

void scale_kernel(const std::vector<at::Tensor>& tensors, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_scale_", [&] {
    const auto s = static_cast<opmath_t<scalar_t>>(scale);
    update_in_place<scalar_t>(tensors, [&](auto v) { return v * decltype(v)(s); });
  });
}

void clamp_kernel(const std::vector<at::Tensor>& tensors, double clip_value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "clip_grad_value_", [&] {
    using T = opmath_t<scalar_t>;
    if (std::isnan(clip_value)) {  // torch.clamp with a NaN bound gives NaN everywhere
      update_in_place<scalar_t>(tensors, [](auto v) { return decltype(v)(std::numeric_limits<T>::quiet_NaN()); });
      return;
    }
    // torch's clamp rounds its bounds to the tensor's dtype first.
    const T hi = static_cast<T>(static_cast<scalar_t>(clip_value));
    const T lo = static_cast<T>(static_cast<scalar_t>(-clip_value));
    update_in_place<scalar_t>(tensors, [&](auto v) {
      using V = decltype(v);
      if constexpr (std::is_floating_point_v<V>) {
        return clamp_like_torch(v, lo, hi);
      } else {
        return at::vec::clamp(v, V(lo), V(hi));  // the same, NaN elements included
      }
    });
  });
}

} // namespace
} // namespace CPU_CAPABILITY

REGISTER_DISPATCH(norm_stub, &fused_optim::CPU_CAPABILITY::norm_kernel)
REGISTER_DISPATCH(penalty_norm_stub, &fused_optim::CPU_CAPABILITY::penalty_norm_kernel)
REGISTER_DISPATCH(scale_stub, &fused_optim::CPU_CAPABILITY::scale_kernel)
REGISTER_DISPATCH(clamp_stub, &fused_optim::CPU_CAPABILITY::clamp_kernel)

} // namespace fused_optim
