// CUDA kernels of the regularization family (the L1+L2 penalty). The value: each block sums |x|
// and x^2 over one chunk into per-chunk partials (fp64), and one cleanup kernel adds them in chunk
// order: deterministic, no float atomics, no host synchronization. The gradients: one elementwise
// pass, with the backward's grad_out read from device memory.
#include "common/elementwise.h"
#include "common/host_paths.h"
#include "common/reduce_order.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace fused_optim::cuda {
namespace {

template <typename scalar_t>
struct AbsSquareSums {
  // partials[2 * chunk] = sum |x|, partials[2 * chunk + 1] = sum x^2 over that chunk.
  __device__ void operator()(TensorListMetadata<1>& meta, double* partials) const {
    using T = at::opmath_type<scalar_t>;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    const auto* x = static_cast<const scalar_t*>(meta.addresses[0][tensor]);
    T abs_sum = 0, sq_sum = 0;  // a thread's run of at most kThreadRun elements (common/reduce_order.h)
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const T v = static_cast<T>(x[i]);
      abs_sum = accumulate(kSumAbs, abs_sum, v, T(1));
      sq_sum = accumulate(kSumSquares, sq_sum, v, T(2));  // v * v and the sum rounded apart, never fused
    }
    const double a = block_sum(static_cast<double>(abs_sum));
    const double s = block_sum(static_cast<double>(sq_sum));
    if (threadIdx.x == 0) {
      const int64_t chunk = meta.first_global_chunk + blockIdx.x;
      partials[2 * chunk] = a;
      partials[2 * chunk + 1] = s;
    }
  }
};

// One block: out = l1 * sum of partials[even] + l2 * sum of partials[odd], in a fixed order; the
// sums of chunks outside [fp64_begin, fp64_end) (the fp64 tensors' chunks) held as fp32 holds them
// (sum_in_opmath_range, as the CPU and the reference).
__global__ void __launch_bounds__(kBlockSize) penalty_cleanup(const double* partials, int64_t chunks, int64_t fp64_begin,
                                                              int64_t fp64_end, double l1, double l2, double* out) {
  double a32 = 0, s32 = 0, a64 = 0, s64 = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const bool fp64 = c >= fp64_begin && c < fp64_end;
    (fp64 ? a64 : a32) += partials[2 * c];
    (fp64 ? s64 : s32) += partials[2 * c + 1];
  }
  a32 = block_sum(a32);
  s32 = block_sum(s32);
  a64 = block_sum(a64);
  s64 = block_sum(s64);
  if (threadIdx.x == 0) {
    *out = penalty_from_sums(l1, l2, sum_in_opmath_range(a32, true) + a64, sum_in_opmath_range(s32, true) + s64);
  }
}

// out = (kAccumulate ? out : 0) + g * (l1 * sign(p) + 2 * l2 * p), g = *grad_out or 1.
template <typename scalar_t, bool kAccumulate>
struct PenaltyGrad {
  __device__ void operator()(TensorListMetadata<2>& meta, const float* grad_out_f, const double* grad_out_d, double l1, double l2) const {
    using T = at::opmath_type<scalar_t>;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(begin + kChunkSize, meta.sizes[tensor]);
    const auto* p = static_cast<const scalar_t*>(meta.addresses[0][tensor]);
    auto* out = static_cast<scalar_t*>(meta.addresses[1][tensor]);
    // The coefficients g * l1 and 2 * g * l2 in fp64, each rounded once to T (as the CPU kernels).
    const double g = grad_out_d != nullptr ? *grad_out_d : grad_out_f != nullptr ? static_cast<double>(*grad_out_f) : 1.0;
    const T a = static_cast<T>(g * l1), b = static_cast<T>(2.0 * g * l2);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const T base = kAccumulate ? static_cast<T>(out[i]) : T(0);
      out[i] = static_cast<scalar_t>(penalty_grad(base, static_cast<T>(p[i]), a, b));
    }
  }
};

at::Tensor l1l2_penalty_cuda(at::TensorList tensors, double l1, double l2) {
  const auto options = tensors.empty() ? at::TensorOptions() : tensors[0].options();
  const at::Tensor partials = at::empty({std::max<int64_t>(2 * num_chunks(tensors), 2)}, options.dtype(at::kDouble));
  int64_t first = 0, fp64_begin = 0, fp64_end = 0;
  l1l2_penalty_host(tensors, l1, l2, kDeviceType, [&](at::ScalarType dtype, const std::vector<at::Tensor>& dense) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l1l2_penalty_cuda", [&] {
      multi_tensor_apply<1>({dense}, first, AbsSquareSums<scalar_t>{}, partials.data_ptr<double>());
    });
    if (dtype == at::kDouble) {  // one group per dtype
      fp64_begin = first;
      fp64_end = first + num_chunks(dense);
    }
    first += num_chunks(dense);
  });
  at::Tensor total = at::empty({}, options.dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(total.device());
  launch(penalty_cleanup, 1, kBlockSize, c10::cuda::getCurrentCUDAStream(), partials.data_ptr<double>(), first, fp64_begin,
         fp64_end, l1, l2, total.data_ptr<double>());
  return total.to(reduction_dtype(tensors));
}

// One dtype group: outs = (kAccumulate ? outs : 0) + g * (l1 * sign(p) + 2 * l2 * p), g from
// *grad_out (fp32 or fp64, on the device) or 1.
template <bool kAccumulate>
void add_penalty_grad(at::ScalarType dtype, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs,
                      const at::Tensor* grad_out, double l1, double l2) {
  const float* g_f = grad_out && grad_out->scalar_type() == at::kFloat ? grad_out->data_ptr<float>() : nullptr;
  const double* g_d = grad_out && grad_out->scalar_type() == at::kDouble ? grad_out->data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l1l2_grad_cuda", [&] {
    multi_tensor_apply<2>({params, outs}, 0, PenaltyGrad<scalar_t, kAccumulate>{}, g_f, g_d, l1, l2);
  });
}

std::vector<at::Tensor> l1l2_penalty_backward_cuda(const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  // Read by the kernel from the tensors' device (a CPU grad_out, which the reference accepts too, is
  // put there first), so no host synchronization.
  at::Tensor g;
  return l1l2_penalty_backward_host(
      grad_out, tensors, l1, l2, kDeviceType,
      [&](at::ScalarType dtype, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
        if (!g.defined()) {
          g = device_scalar(grad_out, params[0].device(), "l1l2_penalty_backward", "grad_out");
        }
        add_penalty_grad<false>(dtype, params, grads, &g, l1, l2);
      });
}

} // namespace

void l1l2_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2) {
  l1l2_grad_host(params, grads, l1, l2, kDeviceType,
                 [&](at::ScalarType dtype, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g) {
                   add_penalty_grad<true>(dtype, p, g, nullptr, l1, l2);
                 });
}

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("l1l2_penalty", &l1l2_penalty_cuda);
  m.impl("l1l2_penalty_backward", &l1l2_penalty_backward_cuda);
  m.impl("l1l2_grad_", &l1l2_grad_cuda);
}

} // namespace fused_optim::cuda
