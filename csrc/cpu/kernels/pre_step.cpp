// Inner loop of the pre-step (pre_step_): the penalty's gradient added and the norm taken in one
// pass, compiled once per CPU capability; it folds as the norm kernels do (common/norm_reduce.h).
#include "common/chunking.h"
#include "common/elementwise.h"
#include "common/norm_reduce.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

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

} // namespace
} // namespace CPU_CAPABILITY

REGISTER_DISPATCH(penalty_norm_stub, &fused_optim::CPU_CAPABILITY::penalty_norm_kernel)

} // namespace fused_optim
