// The CUDA execution model for device code compiled by g++ (test tooling, never shipped): force-
// included (-include simt/cuda.h) before every source of the SIMT build (tests/simt/simt_build.py).
// Kernels and __device__ functions become host functions; the runner (tests/simt/runtime.cpp)
// runs a launch's blocks one after another, each block's threads as fibers switched at every
// barrier. Only what fused_optim's kernels use is here: 1-D launches, the block and warp barriers,
// shuffles, and shared memory declared with FUSED_OPTIM_SHARED (csrc/cuda/launch.cuh).
#pragma once

// The fibers switch with GCC's __builtin_setjmp/__builtin_longjmp (tests/simt/runtime.cpp).
#if !defined(__GNUC__) || defined(__clang__)
#error "the SIMT build is for g++"
#endif

#include <cstddef>
#include <cstdint>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory goes through FUSED_OPTIM_SHARED, so that each block gets fresh, poisoned arrays.
#define __shared__ static_assert(false, "declare shared memory with FUSED_OPTIM_SHARED (csrc/cuda/launch.cuh)");

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using cudaStream_t = struct SimtStream*;

namespace simt {

// The calling fiber's coordinates (valid inside a launch only).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// Runs body() as every thread of `blocks` blocks of `threads` threads; throws std::runtime_error
// naming what went wrong (a race, a deadlock at a barrier, a shuffle outside its mask, ...).
// [params, params + params_bytes) holds the kernel's parameters: read by all, never logged.
void launch(unsigned blocks, unsigned threads, const std::function<void()>& body, const void* params, size_t params_bytes);

void sync_block();
void sync_warp(unsigned mask);
// The value of lane `src` (of this warp) among the lanes of `mask`: bytes in, bytes out.
void exchange(unsigned mask, int src, const void* value, void* out, size_t size);
// This block's storage for the call site `key`: `bytes` poisoned bytes, the same for every thread.
void* shared(const void* key, size_t bytes, size_t align);

template <typename Array, typename Key>
Array& shared_array(Key) {
  static const char key = 0;  // one per instantiation: per call site and element type
  return *static_cast<Array*>(shared(&key, sizeof(Array), alignof(Array)));
}

template <typename T>
T shuffle(unsigned mask, T value, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  T out;
  exchange(mask, src, &value, &out, sizeof(T));
  return out;
}

inline int lane() {
  return static_cast<int>(thread_idx().x % 32);
}

} // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads() {
  simt::sync_block();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::sync_warp(mask);
}
// Lanes are numbered within segments of `width`; a source outside the segment reads the caller's
// own value, as CUDA specifies.
template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
  const int l = simt::lane();
  return simt::shuffle(mask, var, l / width * width + src % width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int l = simt::lane();
  return simt::shuffle(mask, var, l % width + static_cast<int>(delta) < width ? l + static_cast<int>(delta) : l);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int l = simt::lane();
  return simt::shuffle(mask, var, l % width >= static_cast<int>(delta) ? l - static_cast<int>(delta) : l);
}
// A source in a later segment reads the caller's own value; an earlier one is read (as CUDA's).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int l = simt::lane();
  const int src = (l ^ lane_mask) & 31;
  return simt::shuffle(mask, var, src / width <= l / width ? src : l);
}

using std::max;
using std::min;
