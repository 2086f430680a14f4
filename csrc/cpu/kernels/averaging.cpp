// Inner loops of weight averaging (K-input weighted sum) and in-place lerp (EMA, SWA), compiled
// once per CPU capability.
#include "common/chunking.h"
#include "common/elementwise.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>

#include <cmath>

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void weighted_sum(const std::vector<std::vector<at::Tensor>>& inputs, const std::vector<double>& weights,
                  const std::vector<at::Tensor>& outs) {
  using T = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  const int64_t k = static_cast<int64_t>(weights.size());
  std::vector<T> w(weights.begin(), weights.end());
  const ChunkPlan plan(outs);
  plan.parallel_for_each_chunk([&](int64_t c) {
    std::vector<const scalar_t*> src(k);
    plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
      for (int64_t m = 0; m < k; ++m) {
        src[m] = inputs[m][t].const_data_ptr<scalar_t>() + begin;
      }
      scalar_t* dst = outs[t].mutable_data_ptr<scalar_t>() + begin;
      // Every input of a position is read before its output is written, so an output may alias
      // an input. Vector by vector over the K inputs, accumulating in registers: acc + x * w, the
      // product and the sum each rounded (no FMA), as the scalar tail, the portable build and CUDA.
      int64_t i = 0;
      for (; i + vec_step<scalar_t>() <= len; i += vec_step<scalar_t>()) {
        if constexpr (kReducedFloat<scalar_t>) {
          Vec lo(0), hi(0);
          for (int64_t m = 0; m < k; ++m) {
            Vec a, b;
            at::vec::load_to_float(src[m] + i, a, b);
            lo = lo + a * Vec(w[m]);
            hi = hi + b * Vec(w[m]);
          }
          at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + i);
        } else {
          Vec acc(0);
          for (int64_t m = 0; m < k; ++m) {
            acc = acc + Vec::loadu(src[m] + i) * Vec(w[m]);
          }
          acc.store(dst + i);
        }
      }
      for (; i < len; ++i) {
        T acc = 0;
        for (int64_t m = 0; m < k; ++m) {
          acc += static_cast<T>(src[m][i]) * w[m];
        }
        dst[i] = static_cast<scalar_t>(acc);
      }
    });
  });
}

void weighted_sum_kernel(const std::vector<std::vector<at::Tensor>>& inputs, const std::vector<double>& weights,
                         const std::vector<at::Tensor>& outs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outs[0].scalar_type(), "weighted_sum", [&] {
    weighted_sum<scalar_t>(inputs, weights, outs);
  });
}

void lerp_kernel(const std::vector<at::Tensor>& selfs, const std::vector<at::Tensor>& ends, double weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, selfs[0].scalar_type(), "multi_tensor_lerp_", [&] {
    using T = opmath_t<scalar_t>;
    // torch.lerp's arithmetic (lerp_like_torch): the weight rounded to the op-math type first, as
    // torch rounds its scalar weight; the coefficient and base chosen once for the whole call.
    const T w = static_cast<T>(weight);
    const bool small = lerp_weight_is_small(w);
    const T coeff = small ? w : w - T(1);
    const ChunkPlan plan(selfs);
    plan.parallel_for_each_chunk([&](int64_t c) {
      plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
        scalar_t* self = selfs[t].mutable_data_ptr<scalar_t>() + begin;
        update_each<true>(ends[t].const_data_ptr<scalar_t>() + begin, self, len, [&](auto end, auto start) {
          using V = decltype(end);
          if constexpr (std::is_floating_point_v<V>) {
            return lerp_like_torch(start, end, w);
          } else {
            return fma(V(coeff), end - start, small ? start : end);
          }
        });
      });
    });
  });
}

} // namespace
} // namespace CPU_CAPABILITY

REGISTER_DISPATCH(weighted_sum_stub, &fused_optim::CPU_CAPABILITY::weighted_sum_kernel)
REGISTER_DISPATCH(lerp_stub, &fused_optim::CPU_CAPABILITY::lerp_kernel)

} // namespace fused_optim
