#include "common/tensor_list.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

namespace fused_optim {

std::string python_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string python_float(double value) {
  if (std::isnan(value)) {
    return "nan";
  }
  if (std::isinf(value)) {
    return value > 0 ? "inf" : "-inf";
  }
  if (value == 0.0) {
    return std::signbit(value) ? "-0.0" : "0.0";
  }
  // The shortest digits that read back as `value` (Python's repr), as d.ddde[+-]xx.
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*e", precision - 1, value);
    if (std::strtod(buf, nullptr) == value) {
      break;
    }
  }
  std::string s(buf);
  const bool negative = s[0] == '-';
  const size_t e = s.find('e');
  const int exponent = std::stoi(s.substr(e + 1));
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e; ++i) {
    if (s[i] != '.') {
      digits += s[i];
    }
  }
  while (digits.size() > 1 && digits.back() == '0') {
    digits.pop_back();
  }
  // Python's float_repr_style 'short': scientific below 1e-4 and from 1e16 on.
  const int point = exponent + 1;  // digits before the decimal point
  std::string out;
  if (point <= -4 || point > 16) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    std::snprintf(buf, sizeof(buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += buf;
  } else if (point <= 0) {
    out = "0." + std::string(-point, '0') + digits;
  } else if (static_cast<size_t>(point) >= digits.size()) {
    out = digits + std::string(point - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, point) + "." + digits.substr(point);
  }
  return negative ? "-" + out : out;
}

std::string describe_tensor(const at::Tensor& t) {
  std::ostringstream s;
  s << python_dtype(t.scalar_type()) << t.sizes() << " on " << t.device();
  return s.str();
}

void check_floating_list(at::TensorList tensors, const char* name, c10::DeviceType device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), name, "[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(
        is_kernel_float(t.scalar_type()),
        name, "[", i, "] must be a real floating tensor (fp32, fp64, fp16 or bf16), got ",
        python_dtype(t.scalar_type()));
    TORCH_CHECK(
        t.device() == tensors[0].device(), name, " must all be on one device, but ", name, "[0] is on ",
        tensors[0].device(), " and ", name, "[", i, "] is on ", t.device());
  }
  TORCH_CHECK(
      tensors.empty() || tensors[0].device().type() == device, name, " are on ", tensors[0].device(),
      ", but the op runs on ", c10::DeviceTypeName(device, /*lower_case=*/true), " for its other arguments");
}

void check_paired_lists(
    at::TensorList params, const char* params_name, at::TensorList grads, const char* grads_name) {
  TORCH_CHECK_VALUE(
      params.size() == grads.size(), params_name, " and ", grads_name,
      " must have the same length, got ", params.size(), " and ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(
        g.defined() && p.sizes() == g.sizes() && p.scalar_type() == g.scalar_type() &&
            p.device() == g.device(),
        grads_name, "[", i, "] must match ", params_name, "[", i, "] in shape, dtype and device: got ",
        g.defined() ? describe_tensor(g) : std::string("an undefined tensor"), " for ", describe_tensor(p));
  }
}

void check_coefficient(double value, const char* name) {
  TORCH_CHECK_VALUE(
      std::isfinite(value) && value >= 0.0, name, " must be a finite number >= 0, got ", python_float(value));
}

void check_weighted_sum_args(
    at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out, c10::DeviceType device) {
  const size_t k = weights.size();
  TORCH_CHECK_VALUE(k >= 1, "weights must hold one weight per input list, got none");
  for (size_t m = 0; m < k; ++m) {
    TORCH_CHECK_VALUE(std::isfinite(weights[m]), "weights[", m, "] must be finite, got ", python_float(weights[m]));
  }
  TORCH_CHECK_VALUE(
      inputs.size() == k * out.size(), "inputs must hold len(weights) * len(out) = ", k * out.size(),
      " tensors (one list per weight, laid end to end), got ", inputs.size());
  check_floating_list(out, "out", device);
  for (size_t m = 0; m < k; ++m) {
    const std::string name = "inputs (list " + std::to_string(m) + ")";
    check_paired_lists(out, "out", inputs.slice(m * out.size(), out.size()), name.c_str());
  }
  check_writable(out, "out");
  for (size_t m = 0; m < k; ++m) {
    const std::string name = "inputs (list " + std::to_string(m) + ")";
    check_same_or_disjoint(out, "out", inputs.slice(m * out.size(), out.size()), name.c_str());
  }
}

std::vector<at::TensorList> weighted_sum_lists(at::TensorList inputs, at::ArrayRef<double> weights, at::TensorList out) {
  std::vector<at::TensorList> lists{out};
  for (size_t m = 0; m < weights.size(); ++m) {
    lists.push_back(inputs.slice(m * out.size(), out.size()));
  }
  return lists;
}

void check_lerp_lists(at::TensorList self, at::TensorList end, c10::DeviceType device) {
  check_floating_list(self, "self", device);
  check_paired_lists(self, "self", end, "end");
  check_writable(self, "self");
  check_same_or_disjoint(self, "self", end, "end");
}

std::vector<at::Tensor> weighted_sum_outputs(at::TensorList inputs, at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(
      !weights.empty() && inputs.size() % weights.size() == 0, "inputs must hold len(weights) lists of equal length, got ",
      inputs.size(), " tensors for ", weights.size(), " weights");
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < inputs.size() / weights.size(); ++i) {
    out.push_back(at::empty_like(inputs[i]));
  }
  return out;
}

std::optional<double> check_weight_tensor(const at::Tensor& weight, const char* name, c10::Device device) {
  TORCH_CHECK(
      weight.numel() == 1 && at::isFloatingType(weight.scalar_type()), name,
      " must be a floating tensor of one element, got ", python_dtype(weight.scalar_type()), weight.sizes());
  TORCH_CHECK(
      weight.device().is_cpu() || weight.device() == device, name, " must be on the CPU or on ", device,
      " (self's device), got ", weight.device());
  if (!weight.device().is_cpu()) {
    return std::nullopt;
  }
  const double value = weight.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", python_float(value));
  return value;
}

std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> group_by_dtype(at::TensorList tensors) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType dtype = tensors[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == dtype; });
    if (it == groups.end()) {
      groups.emplace_back(dtype, std::vector<int64_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

at::Tensor as_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

std::vector<at::Tensor> select(at::TensorList tensors, const std::vector<int64_t>& idx) {
  std::vector<at::Tensor> subset;
  subset.reserve(idx.size());
  for (int64_t i : idx) {
    subset.push_back(tensors[i]);
  }
  return subset;
}

std::vector<at::Tensor> dense_subset(at::TensorList tensors, const std::vector<int64_t>& idx) {
  std::vector<at::Tensor> subset;
  subset.reserve(idx.size());
  for (int64_t i : idx) {
    subset.push_back(as_dense(tensors[i]));
  }
  return subset;
}

std::vector<at::Tensor> in_layout_of(at::TensorList srcs, const std::vector<at::Tensor>& targets) {
  std::vector<at::Tensor> laid_out;
  laid_out.reserve(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    const at::Tensor& target = targets[i];
    laid_out.push_back(srcs[i].strides() == target.strides() ? srcs[i] : at::empty_like(target).copy_(srcs[i]));
  }
  return laid_out;
}

bool provably_non_overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) {
      dims.emplace_back(t.stride(d), t.size(d));
    }
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // offset of the farthest element of the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) {
      return false;
    }
    span += stride * (size - 1);
  }
  return true;
}

DenseTargets::DenseTargets(at::TensorList tensors) : originals_(tensors) {
  dense_.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    dense_.push_back(as_dense(t));
  }
}

void DenseTargets::write_back() const {
  for (size_t i = 0; i < dense_.size(); ++i) {
    if (!dense_[i].is_same(originals_[i])) {
      originals_[i].copy_(dense_[i]);
    }
  }
}

namespace {

const c10::StorageImpl* storage_of(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
}

} // namespace

void check_writable(at::TensorList written, const char* name) {
  for (size_t i = 0; i < written.size(); ++i) {
    // has_internal_overlap's YES case, tested directly: ~5x fewer instructions a tensor than
    // asking it (callgrind), for lists of thousands.
    const auto sizes = written[i].sizes();
    const auto strides = written[i].strides();
    for (size_t d = 0; d < sizes.size(); ++d) {
      TORCH_CHECK(
          strides[d] != 0 || sizes[d] <= 1, name, "[", i,
          "]: unsupported operation: more than one element of the written-to tensor refers to a single memory "
          "location. Please clone() the tensor before performing the operation.");
    }
  }
}

void check_same_or_disjoint(at::TensorList written, const char* written_name, at::TensorList read, const char* read_name) {
  for (size_t i = 0; i < written.size(); ++i) {
    // Tensors of two storages cannot overlap (the usual case, decided in a few instructions).
    TORCH_CHECK(
        storage_of(written[i]) != storage_of(read[i]) ||
            at::get_overlap_status(written[i], read[i]) != at::MemOverlapStatus::Partial,
        written_name, "[", i, "] and ", read_name, "[", i, "]: unsupported operation: some elements of the input "
        "tensor and the written-to tensor refer to a single memory location. Please clone() the tensor before "
        "performing the operation.");
  }
}

namespace {

// How often each storage is used by the tensors of one call, and whether one of them is written.
// Open addressing over a power-of-two table at least twice the number of tensors, probed linearly:
// ~15 instructions an insert, where ska::flat_hash_map took ~75 (callgrind, 4000 tensors).
class StorageUses {
 public:
  struct Use {
    const c10::StorageImpl* storage = nullptr;
    int count = 0;
    bool written = false;
  };

  explicit StorageUses(size_t n) {
    size_t capacity = 16;
    for (; capacity < 2 * n; capacity *= 2, ++bits_) {
    }
    slots_.resize(capacity);
  }

  Use& operator[](const c10::StorageImpl* storage) {
    // Fibonacci hashing of the address: its high bits pick the slot.
    size_t i = (reinterpret_cast<uintptr_t>(storage) * 0x9E3779B97F4A7C15ull) >> (64 - bits_);
    while (slots_[i].storage != nullptr && slots_[i].storage != storage) {
      i = (i + 1) & (slots_.size() - 1);
    }
    slots_[i].storage = storage;
    return slots_[i];
  }

 private:
  std::vector<Use> slots_;
  int bits_ = 4;
};

// The bytes from a tensor's first element to one past its last, and whose it is.
struct Extent {
  uintptr_t begin, end;
  int64_t position;
  bool written;
};

void add_extent(const at::Tensor& t, int64_t position, bool written, std::vector<Extent>& extents) {
  if (t.numel() == 0) {
    return;
  }
  int64_t span = 1;  // torch's strides are >= 0
  for (int64_t d = 0; d < t.dim(); ++d) {
    span += (t.size(d) - 1) * t.stride(d);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  extents.push_back({begin, begin + static_cast<uintptr_t>(span * t.element_size()), position, written});
}

// The passes: empty when one pass holds every position, else the positions of each pass; position
// j is in a later pass than every earlier position it overlaps.
std::vector<std::vector<int64_t>> sequential_passes(const std::vector<at::TensorList>& lists, size_t num_written) {
  const size_t n = lists.empty() ? 0 : lists[0].size();
  // Only tensors of one storage can overlap, and only if one of them is written: usually no
  // storage is shared, which a hash table tells in O(n) (sorting every extent instead cost up to
  // 140 us for 4000 tensors in allocation order).
  StorageUses uses(lists.size() * n);
  bool shared = false;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < n; ++i) {
      if (lists[l][i].numel() > 0) {
        StorageUses::Use& use = uses[storage_of(lists[l][i])];
        shared |= ++use.count > 1;
        use.written |= l < num_written;
      }
    }
  }
  if (!shared) {
    return {};
  }
  std::vector<Extent> extents;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = lists[l][i];
      if (t.numel() > 0) {
        const StorageUses::Use& use = uses[storage_of(t)];
        if (use.count > 1 && use.written) {
          add_extent(t, static_cast<int64_t>(i), l < num_written, extents);
        }
      }
    }
  }
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  // Extents are swept in address order in clusters of mutually reachable overlaps; pairs are
  // compared only inside a cluster (usually of one extent). Byte ranges are a conservative test:
  // interleaved strided views count as overlapping, which only costs a pass.
  std::vector<std::vector<int64_t>> earlier(n);  // earlier[j]: positions i < j that position j overlaps
  bool any = false;
  for (size_t a = 0; a < extents.size();) {
    size_t b = a + 1;
    uintptr_t end = extents[a].end;
    for (; b < extents.size() && extents[b].begin < end; ++b) {
      end = std::max(end, extents[b].end);
    }
    for (size_t x = a; x < b; ++x) {
      for (size_t y = x + 1; y < b; ++y) {
        const Extent& e = extents[x];
        const Extent& f = extents[y];
        if (e.position != f.position && (e.written || f.written) && f.begin < e.end) {
          earlier[std::max(e.position, f.position)].push_back(std::min(e.position, f.position));
          any = true;
        }
      }
    }
    a = b;
  }
  if (!any) {
    return {};
  }
  std::vector<int64_t> pass(n, 0);
  int64_t num_passes = 1;
  for (size_t j = 0; j < n; ++j) {
    for (int64_t i : earlier[j]) {
      pass[j] = std::max(pass[j], pass[i] + 1);
    }
    num_passes = std::max(num_passes, pass[j] + 1);
  }
  std::vector<std::vector<int64_t>> passes(num_passes);
  for (size_t j = 0; j < n; ++j) {
    passes[pass[j]].push_back(static_cast<int64_t>(j));
  }
  return passes;
}

} // namespace

void run_in_sequential_passes(
    const std::vector<at::TensorList>& lists, size_t num_written,
    const std::function<void(const std::vector<at::TensorList>&)>& f) {
  const auto passes = sequential_passes(lists, num_written);
  if (passes.empty()) {
    f(lists);
    return;
  }
  for (const auto& pass : passes) {
    std::vector<std::vector<at::Tensor>> cut;
    for (const at::TensorList& list : lists) {
      cut.push_back(select(list, pass));
    }
    f(std::vector<at::TensorList>(cut.begin(), cut.end()));
  }
}

bool positions_share_memory(const std::vector<at::TensorList>& lists, size_t num_written) {
  return !sequential_passes(lists, num_written).empty();
}

at::Tensor scalar_result(double value, const at::TensorOptions& options) {
  return at::scalar_tensor(value, options.dtype(at::kDouble)).to(options.dtype());
}

at::ScalarType reduction_dtype(at::TensorList tensors) {
  if (tensors.empty()) {
    return at::kFloat;
  }
  at::ScalarType dtype = at::toOpMathType(tensors[0].scalar_type());
  for (const at::Tensor& t : tensors) {
    dtype = c10::promoteTypes(dtype, at::toOpMathType(t.scalar_type()));
  }
  return dtype;
}

void check_norm_type(double norm_type) {
  TORCH_CHECK_VALUE(!std::isnan(norm_type), "norm_type must be a number, got nan");
}

void check_norm_defined(at::TensorList tensors, double norm_type) {
  if (!(norm_type < 0.0 || norm_type == INFINITY)) {
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(
        tensors[i].numel() > 0, "tensors[", i, "] is empty: linalg.vector_norm cannot compute the ", norm_type,
        " norm on an empty tensor because the operation does not have an identity");
  }
}

void check_clip_value(at::TensorList grads, double clip_value) {
  for (size_t i = 0; i < grads.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[i].scalar_type(), "check_clip_value", [&] {
      const double largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
      TORCH_CHECK(
          !std::isfinite(clip_value) || std::abs(clip_value) <= largest, "clip_value ", python_float(clip_value),
          " cannot be converted to type ", python_dtype(grads[i].scalar_type()), " of grads[", i, "] without overflow");
    });
  }
}

at::ScalarType norm_dtype(at::TensorList tensors) {
  at::ScalarType dtype = tensors.empty() ? at::kFloat : tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) {
    dtype = c10::promoteTypes(dtype, t.scalar_type());
  }
  return dtype;
}

void check_finite_norm(const at::Tensor& total, double norm_type) {
  TORCH_CHECK(
      std::isfinite(total.item<double>()), "The total norm of order ", python_float(norm_type),
      " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error and "
      "scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
}

} // namespace fused_optim
