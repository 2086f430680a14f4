// CUDA kernels of the L1+L2 penalty family. The value: each block sums |x| and x^2 over one
// chunk into per-chunk partials (fp64), and one cleanup kernel adds them in chunk order:
// deterministic, no float atomics, no host synchronization. The gradients: one elementwise pass,
// with the backward's grad_out read from device memory.
#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cuda/multi_tensor_apply.cuh"

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
    T abs_sum = 0, sq_sum = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const T v = static_cast<T>(x[i]);
      abs_sum += ::fabs(v);
      sq_sum += v * v;
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

// One block: out = l1 * sum of partials[even] + l2 * sum of partials[odd], in a fixed order.
__global__ void __launch_bounds__(kBlockSize) penalty_cleanup(const double* partials, int64_t chunks, double l1, double l2, double* out) {
  double a = 0, s = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    a += partials[2 * c];
    s += partials[2 * c + 1];
  }
  a = block_sum(a);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    *out = penalty_from_sums(l1, l2, a, s);
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
    const T g = grad_out_d != nullptr ? static_cast<T>(*grad_out_d) : grad_out_f != nullptr ? static_cast<T>(*grad_out_f) : T(1);
    const T a = g * static_cast<T>(l1), b = g * static_cast<T>(2.0 * l2);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const T v = static_cast<T>(p[i]);
      const T sign = static_cast<T>((v > T(0)) - (v < T(0)));
      const T base = kAccumulate ? static_cast<T>(out[i]) : T(0);
      out[i] = static_cast<scalar_t>(base + a * sign + b * v);
    }
  }
};

at::Tensor l1l2_penalty_cuda(at::TensorList tensors, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", c10::kCUDA);
  const auto groups = group_by_dtype(tensors);
  std::vector<std::vector<at::Tensor>> dense;
  int64_t chunks = 0;
  for (const auto& [dtype, idx] : groups) {
    dense.push_back(dense_subset(tensors, idx));
    chunks += num_chunks(dense.back());
  }
  const auto options = tensors.empty() ? at::TensorOptions() : tensors[0].options();
  at::Tensor partials = at::empty({std::max<int64_t>(2 * chunks, 2)}, options.dtype(at::kDouble));
  at::Tensor total = at::empty({}, options.dtype(at::kDouble));
  int64_t first = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, groups[g].first, "l1l2_penalty_cuda", [&] {
      multi_tensor_apply<1>({dense[g]}, first, AbsSquareSums<scalar_t>{}, partials.data_ptr<double>());
    });
    first += num_chunks(dense[g]);
  }
  const c10::cuda::CUDAGuard guard(total.device());
  penalty_cleanup<<<1, kBlockSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
      partials.data_ptr<double>(), chunks, l1, l2, total.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total.to(reduction_dtype(tensors));
}

template <bool kAccumulate>
void add_penalty_grad(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs,
                      const at::Tensor* grad_out, double l1, double l2) {
  const float* g_f = grad_out && grad_out->scalar_type() == at::kFloat ? grad_out->data_ptr<float>() : nullptr;
  const double* g_d = grad_out && grad_out->scalar_type() == at::kDouble ? grad_out->data_ptr<double>() : nullptr;
  for (const auto& [dtype, idx] : group_by_dtype(params)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l1l2_grad_cuda", [&] {
      multi_tensor_apply<2>({select(params, idx), select(outs, idx)}, 0, PenaltyGrad<scalar_t, kAccumulate>{}, g_f, g_d, l1, l2);
    });
  }
}

std::vector<at::Tensor> l1l2_penalty_backward_cuda(const at::Tensor& grad_out, at::TensorList tensors, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(tensors, "tensors", c10::kCUDA);
  TORCH_CHECK(grad_out.numel() == 1, "grad_out must hold one element, got shape ", grad_out.sizes());
  if (tensors.empty()) {
    return {};
  }
  // Read by the kernel from the tensors' device (a CPU grad_out, which the reference accepts too, is
  // put there first), so no host synchronization.
  const at::Tensor g = device_scalar(grad_out, tensors[0].device());
  std::vector<at::Tensor> params, grads;
  for (const at::Tensor& t : tensors) {
    params.push_back(as_dense(t));
    grads.push_back(at::empty_like(params.back()));
  }
  add_penalty_grad<false>(params, grads, &g, l1, l2);
  return grads;
}

void l1l2_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2) {
  check_coefficient(l1, "l1");
  check_coefficient(l2, "l2");
  check_floating_list(params, "params", c10::kCUDA);
  check_paired_lists(params, "params", grads, "grads");
  check_writable(grads, "grads");
  check_same_or_disjoint(grads, "grads", params, "params");
  run_in_sequential_passes({grads, params}, 1, [&](const std::vector<at::TensorList>& lists) {
    const DenseTargets targets(lists[0]);
    const std::vector<at::Tensor> dense_params = in_layout_of(lists[1], targets.dense());
    add_penalty_grad<true>(dense_params, targets.dense(), nullptr, l1, l2);
    targets.write_back();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("l1l2_penalty", &l1l2_penalty_cuda);
  m.impl("l1l2_penalty_backward", &l1l2_penalty_backward_cuda);
  m.impl("l1l2_grad_", &l1l2_grad_cuda);
}

} // namespace fused_optim::cuda
