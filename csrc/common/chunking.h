// Cutting many tensors into fixed-size work items (CPU side of the multi-tensor contract).
//
// All tensors of one dtype are laid end to end in one virtual flat index space, which is cut into
// chunks of kChunkSize elements. A chunk may span several small tensors, so 2000 tensors of 1000
// elements make 62 work items, not 2000. Chunk boundaries depend only on the tensor sizes, never
// on the thread count, so per-chunk partial results combined in chunk order are deterministic.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// Compiled into every per-capability kernel copy: the inline namespace keeps the copies apart.
namespace fused_optim {
inline namespace CPU_CAPABILITY {

// 32 Ki elements: 128 KiB of fp32, enough to amortize the per-item cost, small enough for the
// last chunks to balance across threads.
constexpr int64_t kChunkSize = 32768;

class ChunkPlan {
 public:
  explicit ChunkPlan(const std::vector<at::Tensor>& tensors) : offsets_(tensors.size() + 1, 0) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      offsets_[i + 1] = offsets_[i] + tensors[i].numel();
    }
  }

  int64_t num_chunks() const {
    return (offsets_.back() + kChunkSize - 1) / kChunkSize;
  }

  // Calls f(tensor_index, begin, length) for each piece of chunk c, in tensor order.
  template <typename F>
  void for_each_piece(int64_t c, const F& f) const {
    int64_t pos = c * kChunkSize;
    const int64_t end = std::min(pos + kChunkSize, offsets_.back());
    // The last tensor starting at or before pos; empty tensors are skipped by upper_bound.
    auto t = static_cast<int64_t>(std::upper_bound(offsets_.begin(), offsets_.end(), pos) - offsets_.begin()) - 1;
    while (pos < end) {
      const int64_t piece_end = std::min(end, offsets_[t + 1]);
      if (piece_end > pos) {
        f(t, pos - offsets_[t], piece_end - pos);
      }
      pos = piece_end;
      ++t;
    }
  }

  // Runs f(chunk_index) for every chunk, spread over torch's intra-op threads.
  template <typename F>
  void parallel_for_each_chunk(const F& f) const {
    at::parallel_for(0, num_chunks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        f(c);
      }
    });
  }

 private:
  std::vector<int64_t> offsets_;  // offsets_[i]: flat index of tensor i's first element
};

} // namespace CPU_CAPABILITY
} // namespace fused_optim
