// Helpers shared by the CUDA kernels: error checking that turns CUDA failures into C++ exceptions
// (pybind11 re-raises them as Python RuntimeError) and warp-level primitives.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lplb {

constexpr unsigned kFullMask = 0xffffffffu;

// Throws with the failing call (or kernel) named, so a Python traceback says what broke.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lplb CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Launch errors (bad configuration, missing kernel image) surface here without a device sync;
// faults inside the kernel surface at the caller's next synchronising call, as usual in CUDA.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

// Integer index types of idx tensors: int32 or int64, selected at run time from the dtype.
template <typename F>
void dispatch_index_type(bool is_int64, F&& f) {
  if (is_int64) {
    f(std::int64_t{0});
  } else {
    f(std::int32_t{0});
  }
}

}  // namespace lplb
