// SIMT build (tests/simt): nothing is ever captured into a CUDA graph.
#pragma once
namespace c10::cuda {
enum class CaptureStatus { None };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return CaptureStatus::None;
}
} // namespace c10::cuda
