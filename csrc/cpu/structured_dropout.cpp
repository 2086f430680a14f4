// CPU ops of structured dropout: one decision per group of elements (DropPath, stochastic depth,
// channel dropout; common/dropout.h), drawn from dropout's stream by run_dropout
// (csrc/cpu/dropout.cpp, cpu/ops.h). The mask is never stored: (seed, offset, group index) decide
// each group.
#include "common/dropout.h"
#include "cpu/ops.h"

#include <torch/library.h>

namespace fused_optim {
namespace cpu {
namespace {

// The structured forms: the groups' multipliers from run_dropout, then one ATen pass.
at::Tensor drop_groups_cpu(const at::Tensor& input, int64_t group_dims, double p, bool scale, const at::Tensor& seed_offset) {
  return drop_groups_out_of_place(input, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

void drop_groups_inplace_cpu(const at::Tensor& input, int64_t group_dims, double p, bool scale, const at::Tensor& seed_offset) {
  drop_groups_in_place(input, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

at::Tensor drop_groups_add_cpu(const at::Tensor& x, const at::Tensor& branch, int64_t group_dims, double p, bool scale,
                               const at::Tensor& seed_offset) {
  return drop_groups_add(x, branch, group_dims, p, scale, [&](const at::Tensor& in, const at::Tensor& out) {
    run_dropout(in, out, p, seed_offset);
  });
}

} // namespace
} // namespace cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("drop_groups", &cpu::drop_groups_cpu);
  m.impl("drop_groups_", &cpu::drop_groups_inplace_cpu);
  m.impl("drop_groups_add", &cpu::drop_groups_add_cpu);
}

} // namespace fused_optim
