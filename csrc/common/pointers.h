// Helpers shared by both extensions (eplb._C and lplb._C). Python hands tensors over as raw
// addresses (`tensor.data_ptr()`), so neither module links libtorch; these turn them back into
// typed pointers and reject arguments that the Python wrappers should never have let through.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace common {

// The typed pointer behind an address from `tensor.data_ptr()`.
template <typename T>
T* address(std::uintptr_t ptr) {
  return reinterpret_cast<T*>(ptr);
}

// Throws std::invalid_argument (ValueError in Python) naming the check that failed. The Python
// wrappers validate first; this is the last line before native code trusts a size.
inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace common
