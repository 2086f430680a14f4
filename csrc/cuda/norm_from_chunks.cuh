// The CUDA norms' last steps, shared by multi_tensor_norm (csrc/cuda/clip_grad.cu) and pre_step_
// (csrc/cuda/pre_step.cu): from per-chunk partials, the per-tensor norms (a block each) and the
// total, each in the fixed order of common/reduce_order.h, so that both ops' norms agree bit for bit.
//
// Internal linkage (an unnamed namespace), as where these were first written: each .cu that
// includes the header compiles its own copy of the device code (nvcc compiles each source whole,
// without relocatable device code, so device functions are not linked across sources).
#pragma once

#include "common/elementwise.h"
#include "common/launch_plan.h"
#include "common/reduce_order.h"
#include "common/tensor_list.h"
#include "cuda/multi_tensor_apply.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fused_optim::cuda {
namespace {

// Step 3 of common/reduce_order.h's order (tree_combine there), given thread t's own fold in fp64;
// the result is valid in every thread.
__device__ double block_combine(Kind kind, double value) {
  FUSED_OPTIM_SHARED(double, shared, [kBlockSize]);
  __syncthreads();
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kBlockSize / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] = combine(kind, shared[threadIdx.x], shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  return shared[0];
}

// Block b: the norm of tensor t = ranges.first_tensor + b from its chunks' partials (combined in
// the order of common/reduce_order.h), and the term it adds to the total as torch defines the
// total (the norm of the per-tensor norms). A block per tensor, so a tensor of many chunks is
// combined in parallel. Chunks [fp64_begin, fp64_end) are the fp64 tensors' (one dtype group):
// the others' sums are held as fp32 holds them (sum_in_opmath_range).
__global__ void __launch_bounds__(kBlockSize) tensor_norms(
    const double* partials, ChunkRanges ranges, int64_t fp64_begin, int64_t fp64_end, Kind kind, double p,
    double* per_tensor, double* terms) {
  const int64_t t = ranges.first_tensor + blockIdx.x;
  const int64_t begin = ranges.begin[blockIdx.x];
  const double acc = block_combine(kind, fold_accumulators(kind, begin + threadIdx.x, ranges.end[blockIdx.x], blockDim.x,
                                                           [&](int64_t c) { return partials[c]; }));
  if (threadIdx.x == 0) {
    const bool fp32 = begin < fp64_begin || begin >= fp64_end;
    const double norm = norm_from_acc(kind, sum_in_opmath_range(acc, fp32), p);
    per_tensor[t] = norm;
    terms[t] = total_term(kind, norm, p);
  }
}

// One block: the total norm from the n per-tensor terms, combined in the same fixed order, as fp64,
// the sum held as fp32 holds it when the norms' dtype is not fp64 (sum_in_opmath_range, as the CPU).
__global__ void __launch_bounds__(kBlockSize) total_norm(const double* terms, int64_t n, Kind kind, double p, bool fp32,
                                                         double* total) {
  const Kind sum_kind = total_kind(kind);
  const double acc =
      block_combine(sum_kind, fold_accumulators(sum_kind, threadIdx.x, n, blockDim.x, [&](int64_t t) { return terms[t]; }));
  if (threadIdx.x == 0) {
    *total = norm_from_acc(kind, sum_in_opmath_range(acc, fp32), p);
  }
}

// The total norm (fp64, on the device) and the per-tensor norms of dense `tensors`, from per-chunk
// partials that partials_of(dtype, idx, first_chunk, partials) writes for each dtype group (the
// tensors idx, chunks numbered from first_chunk): then per-tensor norms, a block each, then the
// total, each combined in a fixed order. Everything a kernel reads is on the device or in its
// arguments (the chunk ranges too), so a CUDA graph's replay reads no host memory.
template <typename PartialsOf>
std::tuple<at::Tensor, at::Tensor> norm_from_chunks(const std::vector<at::Tensor>& tensors, Kind kind, double norm_type,
                                                     const PartialsOf& partials_of) {
  const auto options = tensors[0].options();
  const auto groups = group_by_dtype(tensors);
  std::vector<int64_t> numels;
  for (const at::Tensor& t : tensors) {
    numels.push_back(t.numel());
  }
  std::vector<std::vector<int64_t>> group_idx;
  for (const auto& [dtype, idx] : groups) {
    group_idx.push_back(idx);
  }
  const auto ranges = chunk_ranges(numels, group_idx);  // chunks numbered group by group
  at::Tensor partials = at::empty({std::max<int64_t>(num_chunks(tensors), 1)}, options.dtype(at::kDouble));
  int64_t fp64_begin = 0, fp64_end = 0;
  for (const auto& [dtype, idx] : groups) {
    partials_of(dtype, idx, ranges[idx[0]].first, partials.data_ptr<double>());
    if (dtype == at::kDouble) {
      fp64_begin = ranges[idx.front()].first;
      fp64_end = ranges[idx.back()].second;
    }
  }
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor per = at::empty({n}, options.dtype(at::kDouble));
  at::Tensor terms = at::empty({n}, options.dtype(at::kDouble));
  at::Tensor total = at::empty({}, options.dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(options.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  plan_range_launches(ranges, [&](const ChunkRanges& args, int blocks) {
    launch(tensor_norms, blocks, kBlockSize, stream, partials.data_ptr<double>(), args, fp64_begin, fp64_end, kind, norm_type,
           per.data_ptr<double>(), terms.data_ptr<double>());
  });
  launch(total_norm, 1, kBlockSize, stream, terms.data_ptr<double>(), n, kind, norm_type, norm_dtype(tensors) != at::kDouble,
         total.data_ptr<double>());
  return {total, per};
}

} // namespace
} // namespace fused_optim::cuda
