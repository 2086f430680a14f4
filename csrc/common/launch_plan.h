// The CUDA launcher's plan, as plain host code (no CUDA headers), so that the CPU tests can check it
// (csrc/testing.cpp): which block of which launch takes which chunk of which tensor, when a launch
// is full, and what the kernel arguments weigh. csrc/cuda/multi_tensor_apply.cuh fills its kernel
// arguments from this plan; the norms' per-tensor chunk ranges and the weighted sum's folding of
// K > 8 inputs into passes are here too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fused_optim::cuda {

constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;  // threads of a block
// Tensors per launch for each list depth (1 to 9), and blocks per launch: apex's sizes up to depth
// 5, then sizes that keep the kernel arguments under 4 KiB (8 * tensors * (depth + 1) + 1608
// bytes), as every architecture and CUDA version accepts.
constexpr int kMaxDepth = 9;
constexpr int kMaxTensors[kMaxDepth] = {110, 64, 48, 36, 30, 24, 20, 18, 16};
constexpr int kMaxBlocks = 320;
constexpr int kMaxKernelArgBytes = 4096;
constexpr int kFunctorArgBytes = 512;  // room left for a functor's own arguments (at most 8 doubles)

template <int kDepth>
struct TensorListMetadata {
  static_assert(kDepth >= 1 && kDepth <= kMaxDepth);
  void* addresses[kDepth][kMaxTensors[kDepth - 1]];
  int64_t sizes[kMaxTensors[kDepth - 1]];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int64_t first_global_chunk;  // global index of this launch's block 0
};

// The chunks a tensor of numel elements is cut into.
constexpr int64_t chunks_of(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

template <int... kDepthLess1>
constexpr bool arguments_fit(std::integer_sequence<int, kDepthLess1...>) {
  return ((sizeof(TensorListMetadata<kDepthLess1 + 1>) + kFunctorArgBytes <= kMaxKernelArgBytes) && ...);
}
static_assert(arguments_fit(std::make_integer_sequence<int, kMaxDepth>{}), "kernel arguments over 4 KiB");

// The launches for tensors of the given element counts at list depth `depth`, in order. For each
// launch: slot(s, t) puts tensor t in slot s (a tensor cut by a full launch goes on in the next as
// its slot 0), block(b, s, c) gives block b chunk c of slot s's tensor, and launch(blocks) closes
// the launch. Empty tensors take no slot. A chunk's global index is the count of chunks before it.
template <typename Slot, typename Block, typename Launch>
void plan_launches(const std::vector<int64_t>& numels, int depth, const Slot& slot, const Block& block, const Launch& launch) {
  const int max_tensors = kMaxTensors[depth - 1];
  int tensors = 0, blocks = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    if (numels[t] == 0) {
      continue;
    }
    slot(tensors, t);
    ++tensors;
    const int64_t chunks = chunks_of(numels[t]);
    for (int64_t c = 0; c < chunks; ++c) {
      block(blocks, tensors - 1, c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == max_tensors && last_chunk)) {
        launch(blocks);
        blocks = 0;
        tensors = 0;
        if (!last_chunk) {  // the tensor goes on in the next launch, as its slot 0
          slot(0, t);
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    launch(blocks);
  }
}

// The norms' per-tensor step (csrc/cuda/norm_from_chunks.cuh's tensor_norms): block b of a launch
// reduces the chunk partials [begin[b], end[b]) into the norm of tensor first_tensor + b. The
// ranges are kernel arguments, so a CUDA graph's replay reads nothing from host memory.
constexpr int kMaxRangesPerLaunch = 220;
struct ChunkRanges {
  int64_t first_tensor;
  int64_t begin[kMaxRangesPerLaunch];
  int64_t end[kMaxRangesPerLaunch];
};
static_assert(sizeof(ChunkRanges) + kFunctorArgBytes <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

// Each tensor's chunks {begin, end} (by position in numels) when the chunks are numbered group by
// group (groups: positions, in launch order), each group's tensors in its order, as the
// launcher numbers them when each group's launches start at the chunks before the group.
inline std::vector<std::pair<int64_t, int64_t>> chunk_ranges(
    const std::vector<int64_t>& numels, const std::vector<std::vector<int64_t>>& groups) {
  std::vector<std::pair<int64_t, int64_t>> ranges(numels.size());
  int64_t chunk = 0;
  for (const auto& group : groups) {
    for (int64_t t : group) {
      ranges.at(t) = {chunk, chunk + chunks_of(numels[t])};
      chunk = ranges[t].second;
    }
  }
  return ranges;
}

// The launches of tensor_norms over the tensors' ranges, in order: launch(args, blocks) for each.
template <typename Launch>
void plan_range_launches(const std::vector<std::pair<int64_t, int64_t>>& ranges, const Launch& launch) {
  ChunkRanges args;
  const auto n = static_cast<int64_t>(ranges.size());
  for (int64_t first = 0; first < n; first += kMaxRangesPerLaunch) {
    const int blocks = static_cast<int>(std::min<int64_t>(n - first, kMaxRangesPerLaunch));
    args.first_tensor = first;
    for (int b = 0; b < blocks; ++b) {
      args.begin[b] = ranges[first + b].first;
      args.end[b] = ranges[first + b].second;
    }
    launch(args, blocks);
  }
}

// The passes of the weighted sum over k inputs: {first input, count}. One pass takes up to
// kMaxDepth - 1 inputs (the output is the last list); beyond, the first pass writes the sum of
// kMaxDepth - 1 and each later pass adds up to kMaxDepth - 2 more into it.
inline std::vector<std::pair<int64_t, int64_t>> weighted_sum_passes(int64_t k) {
  constexpr int64_t kMaxInputs = kMaxDepth - 1;
  std::vector<std::pair<int64_t, int64_t>> passes;
  for (int64_t first = 0; first < k;) {
    const int64_t n = std::min(k - first, first > 0 ? kMaxInputs - 1 : kMaxInputs);
    passes.emplace_back(first, n);
    first += n;
  }
  return passes;
}

} // namespace fused_optim::cuda
