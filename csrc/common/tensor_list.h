// Argument checks and grouping shared by every multi-tensor op.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <optional>
#include <utility>
#include <vector>

namespace fused_optim {

// The dtypes every op takes (fp32, fp64, fp16, bf16; not fp8, which at::isFloatingType admits and
// the kernels are not built for), as fused_optim.checks.FLOATING.
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The messages of the checks read as fused_optim/checks.py's (tests/test_check_parity.py): a dtype
// as Python prints it ("torch.float16", not "Half"), a float as Python's repr ("2.0", "1e-05"), a
// tensor's description as "torch.float32[2, 3] on cpu".
std::string python_dtype(at::ScalarType t);
std::string python_float(double value);
std::string describe_tensor(const at::Tensor& t);

// Every tensor of `tensors` (the argument called `name`) is a real floating tensor, all on one
// device, and that of this kernel (`device`): a list wholly on another device type reaches a kernel
// only when another argument's device picked it.
void check_floating_list(at::TensorList tensors, const char* name, c10::DeviceType device);

// `params` and `grads` pair up one to one with equal shape, dtype and device.
void check_paired_lists(
    at::TensorList params, const char* params_name, at::TensorList grads, const char* grads_name);

// A penalty coefficient: finite and >= 0.
void check_coefficient(double value, const char* name);

// The weighted sum's arguments: len(weights) finite weights, and inputs holding len(weights)
// lists laid end to end, each matching out (floating, on one `device`, writable) position by
// position, each input either out[i] itself or disjoint from it.
void check_weighted_sum_args(
    at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out, c10::DeviceType device);

// The weighted sum's lists position-aligned for run_in_sequential_passes: out, then each input list.
std::vector<at::TensorList> weighted_sum_lists(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out);

// The lerp's lists: floating, on one `device`, paired, self writable and each end[i] self[i] or disjoint from it.
void check_lerp_lists(at::TensorList self, at::TensorList end, c10::DeviceType device);

// New outputs of the out-of-place weighted sum, like the first input list (allocated in C++
// rather than in Python: ~1.5 us less per tensor).
std::vector<at::Tensor> weighted_sum_outputs(at::TensorList inputs, at::ArrayRef<double> weights);

// A one-element floating tensor on the CPU or on `device` (a value computed on the GPU is read
// there, without a host sync). Returns its value when it is on the CPU (checked finite), else nullopt.
std::optional<double> check_weight_tensor(const at::Tensor& weight, const char* name, c10::Device device);

// Indices of `tensors` grouped by dtype, groups in order of first appearance, so that the order
// in which group results are combined (and so the result) depends only on the input.
std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> group_by_dtype(at::TensorList tensors);

// A tensor whose elements fill one block of memory (any dense, non-overlapping layout, so a
// transposed weight is read in place); other layouts are copied to a contiguous tensor.
at::Tensor as_dense(const at::Tensor& t);

// tensors[i] for each i in idx.
std::vector<at::Tensor> select(at::TensorList tensors, const std::vector<int64_t>& idx);

// as_dense of tensors[i] for each i in idx.
std::vector<at::Tensor> dense_subset(at::TensorList tensors, const std::vector<int64_t>& idx);

// srcs[i] laid out as targets[i] (a dense tensor of its shape): srcs[i] itself when their strides
// match, else a copy, so that each pair can be walked through memory in step.
std::vector<at::Tensor> in_layout_of(at::TensorList srcs, const std::vector<at::Tensor>& targets);

// Dense stand-ins for tensors updated in place: each tensor itself when dense, else a contiguous
// copy, which write_back() copies into the original once the kernel has run.
class DenseTargets {
 public:
  explicit DenseTargets(at::TensorList tensors);
  const std::vector<at::Tensor>& dense() const {
    return dense_;
  }
  void write_back() const;

 private:
  at::TensorList originals_;
  std::vector<at::Tensor> dense_;
};

// Whether no two elements of t share memory, proved from its sizes and strides (each dim's stride,
// in increasing order, exceeds the span of the smaller ones). False where that cannot be shown
// (an unfold-like view, say), even when the elements happen not to overlap.
bool provably_non_overlapping(const at::Tensor& t);

// What torch checks before writing a tensor in place, for every written tensor `name`[i], before
// anything is written: no two of its elements share memory (an expanded tensor, say), and
// `read`[i], which it is computed from, is either the very same memory (same strides) or disjoint
// from it (ATen's has_internal_overlap and get_overlap_status rules).
void check_writable(at::TensorList written, const char* name);
void check_same_or_disjoint(at::TensorList written, const char* written_name, at::TensorList read, const char* read_name);

// Position-aligned lists (the first `num_written` of them written, the others read) are processed
// as torch's foreach ops process them, position after position, when positions share memory (the
// same tensor listed twice, an output that is another position's input): f(lists) runs once when
// no tensor written at one position overlaps a tensor of another (the usual case), else once per
// pass of positions that do not overlap, on the lists cut to that pass, passes in position order.
void run_in_sequential_passes(
    const std::vector<at::TensorList>& lists, size_t num_written,
    const std::function<void(const std::vector<at::TensorList>&)>& f);

// True when run_in_sequential_passes(lists, num_written, f) would run f more than once.
bool positions_share_memory(const std::vector<at::TensorList>& lists, size_t num_written);

// A 0-dim tensor of `options` holding `value`, converted as torch converts tensors (a finite double
// beyond fp32's range becomes inf, as torch's own fp32 reductions give, instead of an error).
at::Tensor scalar_result(double value, const at::TensorOptions& options);

// The result dtype of a reduction over `tensors`: the promoted math type (fp32 for half types),
// fp32 when the list is empty.
at::ScalarType reduction_dtype(at::TensorList tensors);

// A norm order: any number but nan (inf and -inf included).
void check_norm_type(double norm_type);

// For the orders that have no identity (inf, -inf and p < 0: a max, a min, or a sum of 1/|x|^|p|),
// an empty tensor has no norm: RuntimeError naming it, as torch.linalg.vector_norm refuses it.
void check_norm_defined(at::TensorList tensors, double norm_type);

// clip_value converts to the dtype of every tensor, as torch.clamp_'s scalar bounds must: NaN and
// +-inf do, a finite value beyond the dtype's range does not (RuntimeError, torch's wording).
void check_clip_value(at::TensorList grads, double clip_value);

// The dtype torch.nn.utils gives a norm over tensors: their promoted dtype (fp32 when empty).
at::ScalarType norm_dtype(at::TensorList tensors);

// torch.nn.utils' error when a total norm (a one-element tensor) is nan or inf; reads its value.
void check_finite_norm(const at::Tensor& total, double norm_type);

} // namespace fused_optim
