// Kernels of the shapes in csrc/cuda/, each with a switch that breaks it the way a real kernel
// breaks (test tooling: tests/simt/test_runner.py shows that the runner reports each one, and
// nothing when the switch is off). Ops fused_optim_simt::broken_*, on the CPU key of the SIMT build.
#include "cuda/launch.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace fused_optim::cuda {
namespace {

constexpr unsigned kThreads = 256;

// block_sum of csrc/cuda/multi_tensor_apply.cuh, with or without the barrier between the
// threads' writes and the tree's first reads.
__global__ void block_sum_kernel(const double* x, int64_t n, bool barrier, double* out) {
  FUSED_OPTIM_SHARED(double, shared, [kThreads]);
  double value = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    value += x[i];
  }
  shared[threadIdx.x] = value;
  if (barrier) {
    __syncthreads();
  }
  for (unsigned stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *out = shared[0];
  }
}

// Each lane takes the value of the lane above, as the dropout mask's packing does, with the
// warp's shuffle mask `mask` (all lanes call it).
__global__ void shuffle_kernel(const int64_t* x, unsigned mask, int64_t* out) {
  out[threadIdx.x] = __shfl_down_sync(mask, x[threadIdx.x], 1);
}

// x *= 2 over [0, n + extra): extra = 1 is a tail bound one past the end.
__global__ void tail_kernel(float* x, int64_t n, int64_t extra) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n + extra; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] *= 2;
  }
}

// Block b writes its partial (b + 1) at partials[b / share], or adds it there (accumulate: a read
// and a write of one address, in that order): share = 2 has two blocks write one.
__global__ void partials_kernel(double* partials, unsigned share, bool accumulate) {
  if (threadIdx.x == 0) {
    if (accumulate) {
      partials[blockIdx.x / share] += blockIdx.x + 1.0;
    } else {
      partials[blockIdx.x / share] = blockIdx.x + 1.0;
    }
  }
}

at::Tensor broken_block_sum(const at::Tensor& x, bool barrier) {
  at::Tensor out = at::zeros({}, x.options());
  launch(block_sum_kernel, 1, kThreads, nullptr, x.const_data_ptr<double>(), x.numel(), barrier, out.mutable_data_ptr<double>());
  return out;
}

at::Tensor broken_shuffle(const at::Tensor& x, int64_t mask) {
  at::Tensor out = at::zeros({32}, x.options());
  launch(shuffle_kernel, 1, 32, nullptr, x.const_data_ptr<int64_t>(), static_cast<unsigned>(mask), out.mutable_data_ptr<int64_t>());
  return out;
}

void broken_tail(const at::Tensor& x, int64_t extra) {
  launch(tail_kernel, 2, kThreads, nullptr, x.mutable_data_ptr<float>(), x.numel(), extra);
}

at::Tensor broken_partials(int64_t blocks, int64_t share, bool accumulate) {
  at::Tensor partials = at::zeros({blocks}, at::kDouble);
  launch(partials_kernel, static_cast<unsigned>(blocks), kThreads, nullptr, partials.mutable_data_ptr<double>(),
         static_cast<unsigned>(share), accumulate);
  return partials;
}

} // namespace

TORCH_LIBRARY_FRAGMENT(fused_optim_simt, m) {
  m.def("broken_block_sum(Tensor x, bool barrier) -> Tensor");
  m.def("broken_shuffle(Tensor x, int mask) -> Tensor");
  m.def("broken_tail(Tensor(a!) x, int extra) -> ()");
  m.def("broken_partials(int blocks, int share, bool accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_optim_simt, CPU, m) {
  m.impl("broken_block_sum", &broken_block_sum);
  m.impl("broken_shuffle", &broken_shuffle);
  m.impl("broken_tail", &broken_tail);
}

TORCH_LIBRARY_IMPL(fused_optim_simt, CompositeExplicitAutograd, m) {
  m.impl("broken_partials", &broken_partials);
}

} // namespace fused_optim::cuda
