// CUDA ops of structured dropout: one decision per group of elements (DropPath, stochastic depth,
// channel dropout; common/dropout.h), drawn from dropout's stream by its kernels (run_dropout,
// csrc/cuda/dropout.cu, declared in cuda/ops.h), then one ATen pass. The mask is never stored:
// (seed, offset, group index) decide each group.
#include "common/dropout.h"
#include "cuda/launch.cuh"
#include "cuda/ops.h"

#include <torch/library.h>

namespace fused_optim::cuda {
namespace {

// The structured forms: the groups' multipliers from run_dropout (seed_offset read on the device:
// no host sync), then one ATen pass.
at::Tensor drop_groups_cuda(const at::Tensor& input, int64_t group_dims, double p, bool scale, const at::Tensor& seed_offset) {
  return drop_groups_out_of_place(input, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

void drop_groups_inplace_cuda(const at::Tensor& input, int64_t group_dims, double p, bool scale, const at::Tensor& seed_offset) {
  at::Tensor holder;
  seed_offset_arg(seed_offset, input, holder);  // checked before anything is written
  drop_groups_in_place(input, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

at::Tensor drop_groups_add_cuda(const at::Tensor& x, const at::Tensor& branch, int64_t group_dims, double p, bool scale,
                                const at::Tensor& seed_offset) {
  return drop_groups_add(x, branch, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

} // namespace

FUSED_OPTIM_CUDA_IMPL(m) {
  m.impl("drop_groups", &drop_groups_cuda);
  m.impl("drop_groups_", &drop_groups_inplace_cuda);
  m.impl("drop_groups_add", &drop_groups_add_cuda);
}

} // namespace fused_optim::cuda
