// CUDA kernel of the pre-step (pre_step_): the penalty's gradient added and the norm's partials
// taken in the same pass, folded as multi_tensor_norm folds (cuda/norm_from_chunks.cuh), then the
// clip on gradient clipping's kernels (csrc/cuda/clip_grad.cu, declared in cuda/ops.h).
// pre_step_ makes no host synchronization unless error_if_nonfinite asks for the norm's value.
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "common/reduce_order.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/norm_from_chunks.cuh"
#include "cuda/ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace fused_optim::cuda {
namespace {

// x = penalty_grad(g, w, l1, 2 * l2) (l1l2_grad_'s arithmetic, rounded to the dtype), written into g when
// kWrite, folded into the chunk's partial as NormPartials (csrc/cuda/clip_grad.cu) folds x: the same
// order, so the norm is multi_tensor_norm's over the written gradients, bit for bit.
template <typename scalar_t, bool kWrite>
struct PenaltyNormPartials {
  __device__ void operator()(TensorListMetadata<2>& meta, double l1, double l2, Kind kind, double p, double* partials) const {
    using T = at::opmath_type<scalar_t>;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    const auto* w = static_cast<const scalar_t*>(meta.addresses[0][tensor]);
    auto* g = static_cast<scalar_t*>(meta.addresses[1][tensor]);
    const T a = static_cast<T>(l1), b = static_cast<T>(2.0 * l2);
    const double acc = block_combine(kind, fold_elements(kind, static_cast<T>(p), begin + threadIdx.x, end, blockDim.x, [&](int64_t i) {
      const scalar_t x = static_cast<scalar_t>(penalty_grad(static_cast<T>(g[i]), static_cast<T>(w[i]), a, b));
      if constexpr (kWrite) {
        g[i] = x;
      }
      return static_cast<T>(x);
    }));
    if (threadIdx.x == 0) {
      partials[meta.first_global_chunk + blockIdx.x] = acc;
    }
  }
};

// The coefficient stays on the device: no host synchronization unless error_if_nonfinite.
at::Tensor pre_step_cuda(at::TensorList params, at::TensorList grads, double l1, double l2,
                         std::optional<double> max_norm, double norm_type, std::optional<double> clip_value,
                         bool error_if_nonfinite) {
  return pre_step_host(
      params, grads, l1, l2, max_norm, norm_type, clip_value, error_if_nonfinite, kDeviceType,
      [&](bool write) {
        const Kind kind = norm_kind(norm_type);
        const DenseTargets targets(grads);
        const std::vector<at::Tensor>& dense = targets.dense();
        const std::vector<at::Tensor> laid_out = in_layout_of(params, dense);
        const auto [total, per] = norm_from_chunks(dense, kind, norm_type, [&](at::ScalarType dtype, const std::vector<int64_t>& idx, int64_t first, double* partials) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pre_step_cuda", [&] {
            const std::vector<std::vector<at::Tensor>> lists = {select(laid_out, idx), select(dense, idx)};
            if (write) {
              multi_tensor_apply<2>(lists, first, PenaltyNormPartials<scalar_t, true>{}, l1, l2, kind, norm_type, partials);
            } else {
              multi_tensor_apply<2>(lists, first, PenaltyNormPartials<scalar_t, false>{}, l1, l2, kind, norm_type, partials);
            }
          });
        });
        if (write) {
          targets.write_back();
        }
        return total.to(norm_dtype(grads));
      },
      [&] { l1l2_grad_cuda(params, grads, l1, l2); },
      [&](bool error) { return std::get<0>(multi_tensor_norm_cuda(grads, norm_type, false, error)); },
      [&](const at::Tensor& coef) { scale_by(grads, coef); },
      [&](at::ScalarType dtype, const std::vector<at::Tensor>& g) { clamp_group(dtype, g, *clip_value); });
}

} // namespace

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("pre_step_", &pre_step_cuda);
}

} // namespace fused_optim::cuda
