// Test-only ops (torch.ops.fused_optim_testing.*): the CUDA kernels' index arithmetic run on the
// host, through the same functions the kernels call (common/launch_plan.h, common/dropout.h), so
// that the CPU tests (tests/test_cuda_logic.py) catch an index bug without a GPU.
#include "common/dropout.h"
#include "common/launch_plan.h"
#include "common/reduce_order.h"
#include "common/tensor_list.h"

#include <ATen/OpMathType.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace fused_optim::cuda {
namespace {

// One row per block of every launch: (launch, block, slot, tensor, chunk).
at::Tensor launch_plan(c10::IntArrayRef numels, int64_t depth) {
  TORCH_CHECK(depth >= 1 && depth <= kMaxDepth, "depth must be in [1, ", kMaxDepth, "], got ", depth);
  std::vector<int64_t> rows, slots(kMaxTensors[depth - 1], -1);
  int64_t launch = 0;
  plan_launches(
      numels.vec(), static_cast<int>(depth), [&](int s, int64_t t) { slots.at(s) = t; },
      [&](int b, int s, int64_t c) { rows.insert(rows.end(), {launch, b, s, slots.at(s), c}); },
      [&](int) { ++launch; });
  return at::tensor(rows, at::kLong).view({-1, 5});
}

template <int... kDepthLess1>
std::vector<int64_t> metadata_bytes(std::integer_sequence<int, kDepthLess1...>) {
  return {static_cast<int64_t>(sizeof(TensorListMetadata<kDepthLess1 + 1>))...};
}

// One row per list depth 1..kMaxDepth: (tensors per launch, bytes of the kernel's metadata
// argument), then the limits (blocks per launch, kernel argument bytes), (chunk size, bytes left
// for functors), (tensors per launch of the norms' per-tensor step, bytes of its ranges argument).
at::Tensor launch_limits() {
  const std::vector<int64_t> bytes = metadata_bytes(std::make_integer_sequence<int, kMaxDepth>{});
  std::vector<int64_t> rows;
  for (int d = 0; d < kMaxDepth; ++d) {
    rows.insert(rows.end(), {kMaxTensors[d], bytes[d]});
  }
  rows.insert(rows.end(), {kMaxBlocks, kMaxKernelArgBytes});
  rows.insert(rows.end(), {kChunkSize, kFunctorArgBytes});
  rows.insert(rows.end(), {kMaxRangesPerLaunch, static_cast<int64_t>(sizeof(ChunkRanges))});
  return at::tensor(rows, at::kLong).view({-1, 2});
}

// The weighted sum's passes over k inputs: (first input, count).
at::Tensor passes_of_weighted_sum(int64_t k) {
  std::vector<int64_t> rows;
  for (const auto& [first, n] : weighted_sum_passes(k)) {
    rows.insert(rows.end(), {first, n});
  }
  return at::tensor(rows, at::kLong).view({-1, 2});
}

// The word each of numel elements gets in the CUDA kernels' tiles (int64), as dropout.cu's
// tile_keep computes it: lane by lane, through shared-memory slots.
at::Tensor dropout_tile_words(int64_t numel, int64_t seed, int64_t offset) {
  std::vector<int64_t> out(numel);
  std::vector<uint32_t> slots(kDropoutTile);
  for (int64_t tile = 0; tile * kDropoutTile < numel; ++tile) {
    for (int lane = 0; lane < 32; ++lane) {
      at::Philox4_32 engine(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), tile_lane_block(tile, lane));
      for (int k = 0; k < 4; ++k) {
        slots[tile_slot(lane, k)] = engine();
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      for (int q = 0; q < kDropoutPerLane; ++q) {
        const int64_t i = lane_first_element(tile, lane) + q;
        if (i < numel) {
          out[i] = slots[kDropoutPerLane * lane + q];
        }
      }
    }
  }
  return at::tensor(out, at::kLong);
}

// The packed mask (uint8) of a flat bool keep tensor, as dropout.cu's mask kernel packs it.
at::Tensor dropout_tile_mask(const at::Tensor& keep) {
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1, "keep must be a 1-d bool tensor");
  const at::Tensor k = keep.contiguous();
  const bool* flags = k.const_data_ptr<bool>();
  const int64_t numel = k.numel();
  at::Tensor mask = at::zeros({(numel + 7) / 8}, at::kByte);
  uint8_t* bytes = mask.mutable_data_ptr<uint8_t>();
  for (int64_t tile = 0; tile * kDropoutTile < numel; ++tile) {
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t first = lane_first_element(tile, lane);
      unsigned nibble = 0;
      for (int q = 0; q < kDropoutPerLane; ++q) {
        nibble |= static_cast<unsigned>(first + q < numel && flags[first + q]) << q;
      }
      if (first < numel) {
        bytes[lane_mask_byte(tile, lane)] |= static_cast<uint8_t>(nibble << lane_nibble_shift(lane));
      }
    }
  }
  return mask;
}

// The norms' per-tensor step over tensors of the given sizes, numbered group by group (group[t]:
// tensor t's group, groups in order of first appearance, as dtype groups): one row per block of
// every launch, (launch, block, tensor, first chunk, end chunk), as norm_from_chunks.cuh fills its
// arguments.
at::Tensor norm_chunk_ranges(c10::IntArrayRef numels, c10::IntArrayRef group) {
  TORCH_CHECK(numels.size() == group.size(), "numels and group must have the same length");
  std::vector<std::vector<int64_t>> groups;
  std::vector<int64_t> ids;
  for (size_t t = 0; t < group.size(); ++t) {
    auto it = std::find(ids.begin(), ids.end(), group[t]);
    if (it == ids.end()) {
      groups.emplace_back();
      it = ids.insert(ids.end(), group[t]);
    }
    groups[it - ids.begin()].push_back(static_cast<int64_t>(t));
  }
  std::vector<int64_t> rows;
  int64_t launch = 0;
  plan_range_launches(chunk_ranges(numels.vec(), groups), [&](const ChunkRanges& args, int blocks) {
    for (int b = 0; b < blocks; ++b) {
      rows.insert(rows.end(), {launch, b, args.first_tensor + b, args.begin[b], args.end[b]});
    }
    ++launch;
  });
  return at::tensor(rows, at::kLong).view({-1, 5});
}

// The norm kernels' reduction of a chunk's elements by one block of kBlockSize threads (each thread
// folding in the op-math type of values' dtype), for norm order p: the fp64 partial.
at::Tensor block_reduce(const at::Tensor& values, double p) {
  TORCH_CHECK(at::isFloatingType(values.scalar_type()) && values.dim() == 1, "values must be a 1-d floating tensor");
  const at::Tensor v = values.contiguous().to(at::toOpMathType(values.scalar_type()));
  const double acc = v.scalar_type() == at::kDouble
      ? block_order_reduce<kBlockSize>(norm_kind(p), v.const_data_ptr<double>(), v.numel(), p)
      : block_order_reduce<kBlockSize>(norm_kind(p), v.const_data_ptr<float>(), v.numel(), static_cast<float>(p));
  return at::tensor({acc}, at::kDouble);
}

// The norm kernels' combine of fp64 accumulators by one block of kBlockSize threads, for norm
// order p's accumulator kind.
at::Tensor block_combine(const at::Tensor& values, double p) {
  TORCH_CHECK(values.scalar_type() == at::kDouble && values.dim() == 1, "values must be a 1-d fp64 tensor");
  const at::Tensor v = values.contiguous();
  return at::tensor({block_order_combine<kBlockSize>(norm_kind(p), v.const_data_ptr<double>(), v.numel())}, at::kDouble);
}

// Whether the CUDA scale may walk t through its strides (no two elements share memory, proved).
bool non_overlapping(const at::Tensor& t) {
  return fused_optim::provably_non_overlapping(t);
}

} // namespace

TORCH_LIBRARY(fused_optim_testing, m) {
  m.def("launch_plan(int[] numels, int depth) -> Tensor", &launch_plan);
  m.def("launch_limits() -> Tensor", &launch_limits);
  m.def("weighted_sum_passes(int k) -> Tensor", &passes_of_weighted_sum);
  m.def("dropout_tile_words(int numel, int seed, int offset) -> Tensor", &dropout_tile_words);
  m.def("dropout_tile_mask(Tensor keep) -> Tensor", &dropout_tile_mask);
  m.def("norm_chunk_ranges(int[] numels, int[] group) -> Tensor", &norm_chunk_ranges);
  m.def("block_reduce(Tensor values, float p) -> Tensor", &block_reduce);
  m.def("block_combine(Tensor values, float p) -> Tensor", &block_combine);
  m.def("provably_non_overlapping(Tensor t) -> bool", &non_overlapping);
}

} // namespace fused_optim::cuda
