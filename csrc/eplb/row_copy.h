// Many byte copies on one GPU in one kernel launch (built into eplb._C with the CUDA kernels).
#pragma once

#include <cstdint>
#include <vector>

namespace eplb {

// Queues src[i] -> dst[i] (bytes[i] bytes each) on `stream` of `device`: one launch per 64
// copies, every SM copying chunks of `chunk_bytes`. Any address the device can reach works as
// either end, also a peer GPU's memory mapped into this one (symmetric memory), so one launch
// pushes rows to several peers. Sources and destinations must not overlap. `blocks_per_sm`
// blocks of 512 threads per SM. Throws std::invalid_argument for bad sizes, std::runtime_error
// for CUDA errors.
void copy_rows(int device, const std::vector<std::uintptr_t>& src,
               const std::vector<std::uintptr_t>& dst, const std::vector<std::int64_t>& bytes,
               int blocks_per_sm, std::int64_t chunk_bytes, std::uintptr_t stream);

}  // namespace eplb
