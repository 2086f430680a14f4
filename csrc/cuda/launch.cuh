// What the CUDA sources do differently when the tests compile them for the host (tests/simt: g++,
// FUSED_OPTIM_SIMT defined, the runner's header simt/cuda.h force-included), in one place: how a
// kernel is started, how shared memory is declared, where the ops register, the device type.
// nvcc's build is unchanged by them.
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/cuda/CUDAException.h>

#include <tuple>

namespace fused_optim::cuda {

#ifdef FUSED_OPTIM_SIMT
// The runner's "device" is the CPU: tensors live in host memory, kernels run on fibers.
constexpr c10::DeviceType kDeviceType = c10::kCPU;
// Each block gets fresh storage, poisoned, from the runner.
#define FUSED_OPTIM_SHARED(type, name, dims) type(&name) dims = ::simt::shared_array<type dims>([] {})
// Registered apart (ops of the same schemas in the namespace fused_optim_simt), on the CPU key.
#define FUSED_OPTIM_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fused_optim_simt, CPU, m)
#else
constexpr c10::DeviceType kDeviceType = c10::kCUDA;
#define FUSED_OPTIM_SHARED(type, name, dims) __shared__ type name dims
#define FUSED_OPTIM_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fused_optim, CUDA, m)
#endif

// kernel<<<blocks, threads, 0, stream>>>(args...), checked; on the runner under FUSED_OPTIM_SIMT.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned blocks, unsigned threads, cudaStream_t stream, const Args&... args) {
#ifdef FUSED_OPTIM_SIMT
  (void)stream;
  const std::tuple<Params...> params(args...);  // read by every thread, as a kernel's parameters
  ::simt::launch(blocks, threads, [&] { std::apply(kernel, params); }, &params, sizeof(params));
#else
  kernel<<<blocks, threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

} // namespace fused_optim::cuda
