// Argument checks and grouping shared by every multi-tensor op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>
#include <vector>

namespace fused_optim {

// Every tensor of `tensors` (the argument called `name`) is a real floating tensor on `device`.
void check_floating_list(at::TensorList tensors, const char* name, c10::DeviceType device);

// `params` and `grads` pair up one to one with equal shape, dtype and device.
void check_paired_lists(
    at::TensorList params, const char* params_name, at::TensorList grads, const char* grads_name);

// A penalty coefficient: finite and >= 0.
void check_coefficient(double value, const char* name);

// The weighted sum's arguments: len(weights) finite weights, and inputs holding len(weights)
// lists laid end to end, each matching out (floating, on one `device`) position by position.
void check_weighted_sum_args(
    at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out, c10::DeviceType device);

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
std::vector<at::Tensor> select(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& idx);

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

// The result dtype of a reduction over `tensors`: the promoted math type (fp32 for half types),
// fp32 when the list is empty.
at::ScalarType reduction_dtype(at::TensorList tensors);

// A norm order: any number but nan (inf and -inf included).
void check_norm_type(double norm_type);

// The dtype torch.nn.utils gives a norm over tensors: their promoted dtype (fp32 when empty).
at::ScalarType norm_dtype(at::TensorList tensors);

// torch.nn.utils' error when a total norm (a one-element tensor) is nan or inf; reads its value.
void check_finite_norm(const at::Tensor& total, double norm_type);

} // namespace fused_optim
