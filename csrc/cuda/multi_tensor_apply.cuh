// The CUDA multi-tensor launcher, after apex's multi_tensor_apply: tensor addresses, sizes and a
// block -> (tensor, chunk) table travel in the kernel's arguments; when a launch's table is full
// (tensors or blocks), it is launched and filling goes on. Each block works on one chunk of
// kChunkSize elements of one tensor, so the number of launches grows with the work, not with the
// number of tensors (up to the table's limits). Same chunking contract as the CPU side: a chunk's
// global index (launch offset + block index) is fixed by the tensor sizes alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace fused_optim::cuda {

constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;
// Tensors per launch for each list depth (1 to 9), and blocks per launch: apex's sizes up to depth
// 5, then sizes that keep the kernel arguments under 4 KiB (8 * tensors * (depth + 1) + 1608
// bytes), as every architecture and CUDA version accepts.
constexpr int kMaxDepth = 9;
constexpr int kMaxTensors[kMaxDepth] = {110, 64, 48, 36, 30, 24, 20, 18, 16};
constexpr int kMaxBlocks = 320;

template <int kDepth>
struct TensorListMetadata {
  static_assert(kDepth >= 1 && kDepth <= kMaxDepth);
  void* addresses[kDepth][kMaxTensors[kDepth - 1]];
  int64_t sizes[kMaxTensors[kDepth - 1]];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int64_t first_global_chunk;  // global index of this launch's block 0
};

template <typename Meta, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_apply_kernel(Meta meta, Functor functor, Args... args) {
  functor(meta, args...);
}

// A one-element tensor as a kernel's scalar argument on `device`, fp64 when it is fp64, else fp32.
// A CPU value is read on the host (no device synchronization) and filled in on the device, without
// the blocking host-to-device copy of .to(device); a device value stays where it is, unread.
inline at::Tensor device_scalar(const at::Tensor& value, c10::Device device) {
  const at::ScalarType dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (value.is_cpu()) {
    return at::full({}, value.item<double>(), at::TensorOptions().device(device).dtype(dtype));
  }
  return value.to(device, dtype).reshape({});
}

// Number of chunks the launcher cuts `tensors` into: the size of per-chunk partial buffers.
inline int64_t num_chunks(const std::vector<at::Tensor>& tensors) {
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    chunks += (t.numel() + kChunkSize - 1) / kChunkSize;
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
  int tensors = 0, blocks = 0;
  auto launch = [&] {
    multi_tensor_apply_kernel<<<blocks, kBlockSize, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.first_global_chunk += blocks;
  };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) {
      continue;
    }
    meta.sizes[tensors] = numel;
    for (int d = 0; d < kDepth; ++d) {
      meta.addresses[d][tensors] = lists[d][t].data_ptr();
    }
    ++tensors;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool tensors_full = tensors == kMaxTensors[kDepth - 1] && c == chunks - 1;
      if (blocks == kMaxBlocks || tensors_full) {
        launch();
        blocks = 0;
        if (c == chunks - 1) {
          tensors = 0;
        } else {  // the tensor goes on in the next launch, as its slot 0
          meta.sizes[0] = meta.sizes[tensors - 1];
          for (int d = 0; d < kDepth; ++d) {
            meta.addresses[d][0] = meta.addresses[d][tensors - 1];
          }
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    launch();
  }
}

// Sum over a block (kBlockSize threads) in a fixed order; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T shared[kBlockSize];
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
