// CPU ops of dropout with a counter-based RNG: out of place, in place, and the packed mask (the
// structured forms, csrc/cpu/structured_dropout.cpp, run on run_dropout). The mask is never
// stored: (seed, offset, element index) decide each element (cpu/kernels.h).
#include "cpu/kernels.h"
#include "cpu/ops.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

namespace fused_optim {

DEFINE_DISPATCH(dropout_stub);
DEFINE_DISPATCH(dropout_mask_stub);
REGISTER_AVX512_DISPATCH(dropout_stub, nullptr)
REGISTER_AVX512_DISPATCH(dropout_mask_stub, nullptr)

namespace cpu {
namespace {

// (seed, offset) from the two int64 elements of seed_offset.
std::pair<uint64_t, uint64_t> unpack_seed_offset(const at::Tensor& seed_offset) {
  TORCH_CHECK(
      seed_offset.device().is_cpu() && seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2,
      "seed_offset must be a CPU int64 tensor of 2 elements, got ", seed_offset.toString(), seed_offset.sizes());
  const at::Tensor so = seed_offset.contiguous();
  return {static_cast<uint64_t>(so.const_data_ptr<int64_t>()[0]), static_cast<uint64_t>(so.const_data_ptr<int64_t>()[1])};
}

} // namespace

// Writes dropout(input) into out (declared in cpu/ops.h); both contiguous, possibly the same
// tensor. seed_offset is checked even when p keeps everything, as the reference checks it.
void run_dropout(const at::Tensor& input, const at::Tensor& out, double p, const at::Tensor& seed_offset) {
  const auto [seed, offset] = unpack_seed_offset(seed_offset);
  if (keeps_all(p)) {
    if (!out.is_same(input)) {
      out.copy_(input);
    }
    return;
  }
  dropout_stub(c10::kCPU, input, out, keep_threshold(p), keep_scale(p), seed, offset);
}

namespace {

at::Tensor dropout_cpu(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  return dropout_out_of_place(
      input, [&](const at::Tensor& in, const at::Tensor& out) { run_dropout(in, out, p, seed_offset); });
}

void dropout_inplace_cpu(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  unpack_seed_offset(seed_offset);  // checked before anything is written
  dropout_in_place(input, [&](const at::Tensor& in, const at::Tensor& out) { run_dropout(in, out, p, seed_offset); });
}

at::Tensor dropout_mask_cpu(const at::Tensor& input, double p, const at::Tensor& seed_offset) {
  check_dropout_args(input, p);
  const auto [seed, offset] = unpack_seed_offset(seed_offset);
  at::Tensor mask = at::empty({(input.numel() + 7) / 8}, input.options().dtype(at::kByte));
  dropout_mask_stub(c10::kCPU, mask.mutable_data_ptr<uint8_t>(), input.numel(), keep_threshold(p), seed, offset);
  return mask;
}

} // namespace
} // namespace cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("dropout", &cpu::dropout_cpu);
  m.impl("dropout_", &cpu::dropout_inplace_cpu);
  m.impl("dropout_mask", &cpu::dropout_mask_cpu);
}

} // namespace fused_optim
