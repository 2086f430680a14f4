// The CUDA multi-tensor launcher, after apex's multi_tensor_apply: tensor addresses, sizes and a
// block -> (tensor, chunk) table travel in the kernel's arguments; when a launch's table is full
// (tensors or blocks), it is launched and filling goes on (the plan: common/launch_plan.h, tested
// on the CPU). Each block works on one chunk of kChunkSize elements of one tensor, so the number
// of launches grows with the work, not with the number of tensors (up to the table's limits). Same
// chunking contract as the CPU side: a chunk's global index (launch offset + block index) is fixed
// by the tensor sizes alone.
#pragma once

#include "common/launch_plan.h"
#include "cuda/launch.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace fused_optim::cuda {

template <typename Meta, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_apply_kernel(Meta meta, Functor functor, Args... args) {
  functor(meta, args...);
}

// Refuses `value` (the argument `name` of `op`) when it is on the CPU while `device`'s current
// stream captures a CUDA graph: it is read on the host at capture, so every replay would use that
// value whatever the tensor holds by then (`consequence` says what goes wrong, and the remedy).
inline void check_not_captured_from_cpu(
    const at::Tensor& value, const char* op, const char* name, c10::Device device,
    const char* consequence = "every replay would use its value at capture; pass it on the tensors' device") {
  if (!value.is_cpu()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);  // the capture status of device's current stream
  TORCH_CHECK(
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, "fused_optim ", op, ": ",
      name, " is on the CPU while a CUDA graph is being captured, so ", consequence);
}

// A one-element tensor as a kernel's scalar argument on `device`, fp64 when it is fp64, else fp32.
// A CPU value is read on the host (no device synchronization) and filled in on the device, without
// the blocking host-to-device copy of .to(device), and refused under graph capture; a device value
// is copied on the device (never read on the host), so that it cannot be one of the tensors the
// kernel writes.
inline at::Tensor device_scalar(const at::Tensor& value, c10::Device device, const char* op, const char* name) {
  const at::ScalarType dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (value.is_cpu()) {
    check_not_captured_from_cpu(value, op, name, device);
    return at::full({}, value.item<double>(), at::TensorOptions().device(device).dtype(dtype));
  }
  return value.to(device, dtype, /*non_blocking=*/false, /*copy=*/true).reshape({});
}

// Number of chunks the launcher cuts `tensors` into: the size of per-chunk partial buffers.
inline int64_t num_chunks(at::TensorList tensors) {
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    chunks += chunks_of(t.numel());
  }
  return chunks;
}

// Runs functor(meta, args...) over every chunk of lists[0][i] (and the same chunk of
// lists[1..kDepth)[i]), on the current stream of lists[0][0]'s device. Tensors must be dense
// with one layout per position; first_chunk offsets the global chunk indices.
template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(
    const std::vector<std::vector<at::Tensor>>& lists, int64_t first_chunk, Functor functor, Args... args) {
  TORCH_INTERNAL_ASSERT(static_cast<int>(lists.size()) == kDepth);
  const int64_t n = static_cast<int64_t>(lists[0].size());
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMetadata<kDepth> meta;
  meta.first_global_chunk = first_chunk;
  std::vector<int64_t> numels(n);
  for (int64_t t = 0; t < n; ++t) {
    numels[t] = lists[0][t].numel();
  }
  plan_launches(
      numels, kDepth,
      [&](int s, int64_t t) {
        meta.sizes[s] = numels[t];
        for (int d = 0; d < kDepth; ++d) {
          meta.addresses[d][s] = lists[d][t].data_ptr();
        }
      },
      [&](int b, int s, int64_t c) {
        meta.block_to_tensor[b] = static_cast<unsigned char>(s);
        meta.block_to_chunk[b] = static_cast<int>(c);
      },
      [&](int blocks) {
        launch(multi_tensor_apply_kernel<TensorListMetadata<kDepth>, Functor, Args...>, blocks, kBlockSize, stream, meta, functor,
               args...);
        meta.first_global_chunk += blocks;
      });
}

// Sum over a block (kBlockSize threads) in a fixed order; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T value) {
  FUSED_OPTIM_SHARED(T, shared, [kBlockSize]);
  __syncthreads();  // a previous call's readers of shared[0] are done
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kBlockSize / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  return shared[0];
}

} // namespace fused_optim::cuda
