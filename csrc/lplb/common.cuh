// Helpers shared by the CUDA kernels: error checking that turns CUDA failures into C++ exceptions
// (pybind11 re-raises them as Python RuntimeError) and warp-level primitives.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_checks.h"

namespace lplb {

constexpr unsigned kFullMask = 0xffffffffu;

// Throws with the failing call (or kernel) named, so a Python traceback says what broke.
inline void check_cuda(cudaError_t err, const char* what) { common::check_cuda(err, "lplb", what); }

// Launch errors (bad configuration, missing kernel image) surface here without a device sync;
// faults inside the kernel surface at the caller's next synchronising call, as usual in CUDA.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Programmatic dependent launch (Hopper): `launch` lets a kernel's blocks be scheduled while the
// kernel before it on the stream is still running, which hides the launch latency between the
// kernels of a call. Each kernel so launched calls wait_for_inputs() before it touches global
// memory that another kernel writes (only shared memory and the layout maps, which no kernel
// writes, come before), and allow_dependents() only after that wait: so at most two kernels
// overlap, the later one still waiting, and every kernel starts after all but the one before it
// have finished, as with ordinary launches (no cache line read before its launch can be stale).
// Where the kernel before is not one of ours, or on older GPUs, the launch is an ordinary one
// and the wait returns at once.
#if defined(__CUDACC__)
__device__ __forceinline__ void wait_for_inputs() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void allow_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#endif

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...), name);
}

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
