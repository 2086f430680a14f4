// Inner loops of the regularization family (the L1+L2 penalty), compiled once per CPU capability
// (see setup.py).
#include "common/chunking.h"
#include "common/vec.h"
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>

namespace fused_optim {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
std::array<double, 2> abs_and_square_sums(const std::vector<at::Tensor>& tensors) {
  using T = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  const ChunkPlan plan(tensors);
  std::vector<std::array<double, 2>> partial(plan.num_chunks());
  plan.parallel_for_each_chunk([&](int64_t c) {
    double abs_sum = 0, sq_sum = 0;
    plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
      const scalar_t* x = tensors[t].const_data_ptr<scalar_t>() + begin;
      // Vector lanes sum at most kReduceBlock / lanes elements before flushing into fp64, which
      // keeps fp32 accumulation error near that of torch.sum's cascade.
      for (int64_t off = 0; off < len; off += kReduceBlock) {
        Vec abs_acc[kAccumulators] = {Vec(0), Vec(0), Vec(0), Vec(0)};
        Vec sq_acc[kAccumulators] = {Vec(0), Vec(0), Vec(0), Vec(0)};
        T abs_tail = 0, sq_tail = 0;
        for_each_vec(
            x + off, std::min(kReduceBlock, len - off),
            [&](int k, const Vec& v) {
              abs_acc[k] += v.abs();
              sq_acc[k] = sq_acc[k] + v * v;  // unfused, as the scalar tail
            },
            [&](T v) {
              abs_tail += std::abs(v);
              sq_tail += v * v;
            });
        for (int k = 0; k < kAccumulators; ++k) {
          abs_sum += sum_lanes(abs_acc[k]);
          sq_sum += sum_lanes(sq_acc[k]);
        }
        abs_sum += abs_tail;
        sq_sum += sq_tail;
      }
    });
    partial[c] = {abs_sum, sq_sum};
  });
  std::array<double, 2> total{0, 0};
  for (const auto& s : partial) {  // chunk order: deterministic whatever the thread count
    total[0] += s[0];
    total[1] += s[1];
  }
  return total;
}

std::array<double, 2> l1l2_sums_kernel(const std::vector<at::Tensor>& tensors) {
  std::array<double, 2> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "l1l2_penalty", [&] {
    sums = abs_and_square_sums<scalar_t>(tensors);
  });
  return sums;
}

template <bool kAccumulate, typename scalar_t>
void add_penalty_grad(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs, double a, double b) {
  using T = opmath_t<scalar_t>;
  const T a_ = static_cast<T>(a), b_ = static_cast<T>(b);
  const ChunkPlan plan(params);
  plan.parallel_for_each_chunk([&](int64_t c) {
    plan.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t len) {
      update_each<kAccumulate>(
          params[t].const_data_ptr<scalar_t>() + begin, outs[t].mutable_data_ptr<scalar_t>() + begin,
          len, [&](auto p, auto g) {
            using V = decltype(p);
            return g + V(a_) * sign(p) + V(b_) * p;
          });
    });
  });
}

void l1l2_grad_kernel(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& outs, double a, double b,
    bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "l1l2_grad", [&] {
    if (accumulate) {
      add_penalty_grad<true, scalar_t>(params, outs, a, b);
    } else {
      add_penalty_grad<false, scalar_t>(params, outs, a, b);
    }
  });
}

} // namespace
} // namespace CPU_CAPABILITY

REGISTER_DISPATCH(l1l2_sums_stub, &fused_optim::CPU_CAPABILITY::l1l2_sums_kernel)
REGISTER_DISPATCH(l1l2_grad_stub, &fused_optim::CPU_CAPABILITY::l1l2_grad_kernel)

} // namespace fused_optim
