// Inner loops of multi-tensor norms, scaling and clamping, compiled once per CPU capability.
#include "common/chunking.h"
#include "common/elementwise.h"
#include "common/norm_reduce.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <utility>

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

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
REGISTER_DISPATCH(scale_stub, &fused_optim::CPU_CAPABILITY::scale_kernel)
REGISTER_DISPATCH(clamp_stub, &fused_optim::CPU_CAPABILITY::clamp_kernel)

} // namespace fused_optim
