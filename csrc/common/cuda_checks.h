// CUDA helpers shared by both extensions' CUDA sources (eplb._C's row copies, lplb._C's kernels).
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace common {

// Throws std::runtime_error (RuntimeError in Python) naming the module and the failing call (or
// kernel), so a Python traceback says what broke.
inline void check_cuda(cudaError_t err, const char* module, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(module) + " CUDA error in " + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// cudaDeviceGetAttribute of `device`, asked once per (attribute, device): launches on a hot path
// need them every call.
inline int device_attribute(cudaDeviceAttr attr, int device, const char* module) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, int> key(static_cast<int>(attr), device);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), module, "cudaDeviceGetAttribute");
  known.emplace(key, value);
  return value;
}

}  // namespace common
