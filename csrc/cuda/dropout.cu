// CUDA dropout with the counter-based stream of common/dropout.h: the same (seed, offset) gives
// the same mask as the CPU kernels and the reference, bit for bit. One pass, in place or not;
// the mask is regenerated for backward, never stored.
//
// Each warp takes a tile of 4 groups (128 elements): lane l computes Philox block 8 * g + l % 8
// of group g = first + l / 8 (its 4 words belong to elements 8 apart), the words go through
// shared memory, and lane l then applies them to elements 4l..4l+3 of the tile, with one vector
// load and store (16 bytes for fp32) where the pointers allow it.
//
// (seed, offset): a CPU tensor is read on the host; a tensor on the input's device (drawn there
// by torch.randint on the CUDA generator) is read by the kernel: no host synchronization, and a
// CUDA graph replays a new draw each time. A CPU pair under capture would repeat one mask on every
// replay, so it is refused.
#include "common/dropout.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/native/cuda/MemoryAccess.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fused_optim::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = kDropoutTile;  // elements per warp (common/dropout.h)
constexpr int kPerLane = kDropoutPerLane;

// The keep flags of elements 4l..4l+3 of this warp's tile (lane l), from the stream.
__device__ void tile_keep(int64_t tile, SeedOffset so, uint64_t threshold, bool keep[kPerLane]) {
  FUSED_OPTIM_SHARED(uint32_t, words, [kWarps][kTile]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint64_t seed = so.device != nullptr ? static_cast<uint64_t>(so.device[0]) : so.seed;
  const uint64_t offset = so.device != nullptr ? static_cast<uint64_t>(so.device[1]) : so.offset;
  at::Philox4_32 engine(seed, offset, tile_lane_block(tile, lane));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    words[warp][tile_slot(lane, k)] = engine();
  }
  __syncwarp();
#pragma unroll
  for (int q = 0; q < kPerLane; ++q) {
    keep[q] = words[warp][kPerLane * lane + q] < threshold;
  }
  __syncwarp();  // the words are read before a next tile would overwrite them
}

// out = in * (kept ? scale : 0): multiplying by 0 keeps a dropped nan nan, as torch.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) dropout_kernel(
    const scalar_t* in, scalar_t* out, int64_t numel, uint64_t threshold, at::opmath_type<scalar_t> scale, SeedOffset so) {
  using T = at::opmath_type<scalar_t>;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t first = lane_first_element(tile, threadIdx.x % 32);
  bool keep[kPerLane];
  tile_keep(tile, so, threshold, keep);
  if (kVector && first + kPerLane <= numel) {
    using Vec = at::native::memory::aligned_vector<scalar_t, kPerLane>;
    Vec v = *reinterpret_cast<const Vec*>(in + first);
#pragma unroll
    for (int q = 0; q < kPerLane; ++q) {
      v.val[q] = static_cast<scalar_t>(static_cast<T>(v.val[q]) * (keep[q] ? scale : T(0)));
    }
    *reinterpret_cast<Vec*>(out + first) = v;
    return;
  }
#pragma unroll
  for (int q = 0; q < kPerLane; ++q) {
    if (first + q < numel) {
      out[first + q] = static_cast<scalar_t>(static_cast<T>(in[first + q]) * (keep[q] ? scale : T(0)));
    }
  }
}

// Bit i % 8 of mask[i / 8] = element i kept; bits past numel are 0. Lanes 2m and 2m + 1 hold the
// two halves of byte m of the tile.
__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(uint8_t* mask, int64_t numel, uint64_t threshold, SeedOffset so) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t first = lane_first_element(tile, lane);
  bool keep[kPerLane];
  tile_keep(tile, so, threshold, keep);
  unsigned nibble = 0;
#pragma unroll
  for (int q = 0; q < kPerLane; ++q) {
    nibble |= static_cast<unsigned>(keep[q] && first + q < numel) << q;
  }
  const unsigned high = __shfl_down_sync(0xffffffffu, nibble, 1);
  if (lane % 2 == 0 && first < numel) {
    mask[lane_mask_byte(tile, lane)] = static_cast<uint8_t>(nibble | (high << lane_nibble_shift(lane + 1)));
  }
}

int64_t num_blocks(int64_t numel) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  return (tiles + kWarps - 1) / kWarps;
}

} // namespace

// The kernel's view of seed_offset; `holder` keeps a device copy alive until the launch.
SeedOffset seed_offset_arg(const at::Tensor& seed_offset, const at::Tensor& input, at::Tensor& holder) {
  TORCH_CHECK(
      seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 &&
          (seed_offset.device().is_cpu() || seed_offset.device() == input.device()),
      "seed_offset must be an int64 tensor of 2 elements on the CPU or on ", input.device(), ", got ",
      seed_offset.toString(), seed_offset.sizes(), " on ", seed_offset.device());
  if (!seed_offset.device().is_cpu()) {
    holder = seed_offset.contiguous();
    return {holder.const_data_ptr<int64_t>(), 0, 0};
  }
  check_not_captured_from_cpu(seed_offset, "dropout", "seed_offset", input.device(),
                              "every replay would repeat one mask; draw it on the GPU (fused_optim.dropout does so "
                              "for CUDA inputs)");
  const at::Tensor so = seed_offset.contiguous();
  return {nullptr, static_cast<uint64_t>(so.const_data_ptr<int64_t>()[0]),
          static_cast<uint64_t>(so.const_data_ptr<int64_t>()[1])};
}

// Writes dropout(input) into out; both contiguous, possibly the same tensor.
void run_dropout(const at::Tensor& input, const at::Tensor& out, double p, const at::Tensor& seed_offset) {
  at::Tensor holder;
  const SeedOffset so = seed_offset_arg(seed_offset, input, holder);
  if (keeps_all(p) || input.numel() == 0) {
    if (!out.is_same(input)) {
      out.copy_(input);
    }
    return;
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto* in = input.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    constexpr size_t kVectorBytes = sizeof(scalar_t) * kPerLane;
    const bool aligned = reinterpret_cast<uintptr_t>(in) % kVectorBytes == 0 && reinterpret_cast<uintptr_t>(o) % kVectorBytes == 0;
    const T scale = static_cast<T>(keep_scale(p));
    launch(aligned ? dropout_kernel<scalar_t, true> : dropout_kernel<scalar_t, false>, num_blocks(input.numel()), kThreads, stream,
           in, o, input.numel(), keep_threshold(p), scale, so);
  });
}

namespace {

at::Tensor dropout_cuda(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  return dropout_out_of_place(
      input, [&](const at::Tensor& in, const at::Tensor& out) { run_dropout(in, out, p, seed_offset); });
}

void dropout_inplace_cuda(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  at::Tensor holder;
  seed_offset_arg(seed_offset, input, holder);  // checked before anything is written
  dropout_in_place(input, [&](const at::Tensor& in, const at::Tensor& out) { run_dropout(in, out, p, seed_offset); });
}

at::Tensor dropout_mask_cuda(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  at::Tensor holder;
  const SeedOffset so = seed_offset_arg(seed_offset, input, holder);
  at::Tensor mask = at::empty({(input.numel() + 7) / 8}, input.options().dtype(at::kByte));
  if (input.numel() > 0) {
    const c10::cuda::CUDAGuard guard(input.device());
    // p == 0 keeps every element: a threshold of 2^32 is above every word.
    launch(dropout_mask_kernel, num_blocks(input.numel()), kThreads, c10::cuda::getCurrentCUDAStream(),
           mask.mutable_data_ptr<uint8_t>(), input.numel(), keep_threshold(p), so);
  }
  return mask;
}

} // namespace

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_inplace_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

} // namespace fused_optim::cuda
