// SIMT build (tests/simt): one stream, which the runner ignores (launches run at once, in order).
#pragma once
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const {
    return nullptr;
  }
};
inline CUDAStream getCurrentCUDAStream() {
  return {};
}
} // namespace c10::cuda
