// SIMT build (tests/simt): the device guard has no device to set; the "device" is the CPU.
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
} // namespace c10::cuda
