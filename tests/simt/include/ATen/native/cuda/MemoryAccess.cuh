// SIMT build (tests/simt): the one type of ATen's header that the kernels use, with its layout
// (an array aligned to its whole size, so that it loads in one access).
#pragma once
namespace at::native::memory {
template <typename scalar_t, int vec_size>
struct alignas(sizeof(scalar_t) * vec_size) aligned_vector {
  scalar_t val[vec_size];
};
} // namespace at::native::memory
