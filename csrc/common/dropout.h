// Dropout's definitions shared by the CPU and CUDA kernels: the random stream, the keep
// threshold, the argument checks.
#pragma once

#include "common/tensor_list.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/ones.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace fused_optim {

// Dropout's random stream (shared by every backend, bit for bit): element i of a tensor, in
// row-major logical order, takes the 32-bit word k = (i % 32) / 8 of Philox4x32-10 block
// b = 8 * (i / 32) + i % 8, keyed by seed, with counter (lo32(b), hi32(b), lo32(offset),
// hi32(offset)) (ATen's philox_engine(seed, offset, b)). Element i is kept iff word < threshold,
// threshold = floor((1 - p) * 2^32). Groups of 32 elements are thus 8 blocks side by side, the
// layout a SIMD or CUDA implementation makes without shuffles.
constexpr int64_t kDropoutGroup = 32;

// The CUDA kernels' tiles (csrc/cuda/dropout.cu), as host-device arithmetic that the CPU tests
// check against the stream (csrc/testing.cpp): a warp takes a tile of kDropoutTileGroups groups;
// lane l computes Philox block tile_lane_block(tile, l) and puts its word k at slot
// tile_slot(l, k) of the tile, then applies slots kDropoutPerLane * l + q to elements
// lane_first_element(tile, l) + q. For the packed mask, lane l's keep bits are the nibble
// lane_nibble_shift(l) of byte lane_mask_byte(tile, l).
constexpr int kDropoutTileGroups = 4;
constexpr int64_t kDropoutTile = kDropoutTileGroups * kDropoutGroup;  // elements per warp
constexpr int kDropoutPerLane = static_cast<int>(kDropoutTile / 32);

C10_HOST_DEVICE inline uint64_t tile_lane_block(int64_t tile, int lane) {
  return 8 * static_cast<uint64_t>(kDropoutTileGroups * tile + lane / 8) + lane % 8;
}

C10_HOST_DEVICE inline int tile_slot(int lane, int k) {
  return (lane / 8) * static_cast<int>(kDropoutGroup) + 8 * k + lane % 8;
}

C10_HOST_DEVICE inline int64_t lane_first_element(int64_t tile, int lane) {
  return tile * kDropoutTile + kDropoutPerLane * lane;
}

C10_HOST_DEVICE inline int64_t lane_mask_byte(int64_t tile, int lane) {
  return lane_first_element(tile, lane) / 8;
}

C10_HOST_DEVICE inline int lane_nibble_shift(int lane) {
  return kDropoutPerLane * (lane % 2);
}

// floor((1 - p) * 2^32); the Python reference computes the same double expression.
inline uint64_t keep_threshold(double p) {
  return static_cast<uint64_t>((1.0 - p) * 4294967296.0);
}

// Whether every element is kept: p == 0, and any p so small that 1 - p rounds to 1 (then the
// threshold is 2^32, above every word, and the scale is exactly 1, as for torch's dropout).
inline bool keeps_all(double p) {
  return keep_threshold(p) > UINT32_MAX;
}

// The factor of kept elements: 1 / (1 - p), and 0 for p == 1 (every element dropped).
inline double keep_scale(double p) {
  return p == 1.0 ? 0.0 : 1.0 / (1.0 - p);
}

inline void check_dropout_args(const at::Tensor& input, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", python_float(p));
  TORCH_CHECK_TYPE(
      is_kernel_float(input.scalar_type()),
      "input must be a real floating tensor (fp32, fp64, fp16 or bf16), got ", python_dtype(input.scalar_type()));
}

// Out of place and in place over a backend's run(in, out), which takes contiguous tensors (the
// stream follows logical row-major order) and may be given out == in. The out-of-place result has
// the input's layout, as torch's dropout gives (channels_last stays channels_last); a layout other
// than the contiguous one costs a copy in and a copy out.
template <typename Run>
at::Tensor dropout_out_of_place(const at::Tensor& input, const Run& run) {
  at::Tensor out = at::empty_like(input);
  if (out.is_contiguous()) {
    run(input.contiguous(), out);
    return out;
  }
  const at::Tensor tmp = input.contiguous();  // a copy: input is not contiguous
  run(tmp, tmp);
  return out.copy_(tmp);
}

// The in-place form refuses an input whose elements share memory (an expanded tensor), as torch's
// in-place ops do, before anything is written.
template <typename Run>
void dropout_in_place(const at::Tensor& input, const Run& run) {
  check_writable(input, "input");
  if (input.is_contiguous()) {
    run(input, input);
    return;
  }
  const at::Tensor tmp = input.contiguous();
  run(tmp, tmp);
  input.copy_(tmp);
}

// Structured dropout (DropPath, channel dropout): one keep/drop decision per group of elements, a
// group being an index into the first group_dims dims of the input (a sample for DropPath, a
// (sample, channel) for channel dropout, the whole tensor for group_dims = 0). Group g, in
// row-major order over those dims, takes element g of the dropout stream above, so its decision
// does not depend on the threads, the layout or the device. The kept groups are multiplied by
// keep_scale(p) rounded to the input's dtype (by 1 without `scale`), as torch's and timm's
// broadcast multiply does, in one ATen elementwise pass over the input.
inline void check_drop_groups_args(const at::Tensor& input, int64_t group_dims, double p) {
  check_dropout_args(input, p);
  TORCH_CHECK_VALUE(group_dims >= 0 && group_dims <= input.dim(), "group_dims must be between 0 and input.dim() = ",
                    input.dim(), ", got ", group_dims);
}

// The groups' multipliers, shaped to broadcast against the input (its first group_dims sizes, then
// ones), from the backend's element dropout run(in, out) on a tensor of ones.
template <typename Run>
at::Tensor group_multipliers(const at::Tensor& input, int64_t group_dims, double p, bool scale, const Run& run) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().begin() + group_dims);
  shape.resize(input.dim(), 1);
  const at::Tensor m = at::ones(shape, input.options());
  run(m, m);
  return scale ? m : at::ne(m, 0).to(input.scalar_type());
}

template <typename Run>
at::Tensor drop_groups_out_of_place(const at::Tensor& input, int64_t group_dims, double p, bool scale, const Run& run) {
  check_drop_groups_args(input, group_dims, p);
  return at::mul(input, group_multipliers(input, group_dims, p, scale, run));
}

// Refuses an input whose elements share memory before anything is written, as dropout_in_place.
template <typename Run>
void drop_groups_in_place(const at::Tensor& input, int64_t group_dims, double p, bool scale, const Run& run) {
  check_drop_groups_args(input, group_dims, p);
  check_writable(input, "input");
  input.mul_(group_multipliers(input, group_dims, p, scale, run));
}

// x + drop_groups(branch) in one pass (the residual of a block with stochastic depth).
template <typename Run>
at::Tensor drop_groups_add(const at::Tensor& x, const at::Tensor& branch, int64_t group_dims, double p, bool scale,
                           const Run& run) {
  check_drop_groups_args(branch, group_dims, p);
  TORCH_CHECK_VALUE(x.sizes() == branch.sizes(), "x and branch must have the same shape, got ", x.sizes(), " and ",
                    branch.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == branch.scalar_type(), "x and branch must have the same dtype, got ",
                   python_dtype(x.scalar_type()), " and ", python_dtype(branch.scalar_type()));
  TORCH_CHECK(x.device() == branch.device(), "x and branch must be on the same device, got ", x.device(), " and ",
              branch.device());
  return at::addcmul(x, branch, group_multipliers(branch, group_dims, p, scale, run));
}

} // namespace fused_optim
