// Many byte copies on one GPU in one kernel launch (built into eplb._C with the CUDA kernels).
#pragma once

#include <cstdint>
#include <vector>

namespace eplb {

// A condition that a launch checks on the device before it copies anything: every row of the
// int64 table [rows, cols] equals row `rank`, whose first value is 1, and the gate is not
// closed. `table` comes from work queued before the launch (say, an all-reduce of every rank's
// row), so a launch can be queued before anyone knows whether it may copy. state[0] is
// kGateOpen, then kGateClaimed once a launch passed (every later launch through the gate
// passes too, so copies split over launches run all or none) or kGateClosed by close_gate.
constexpr int kGateOpen = 0;
constexpr int kGateClaimed = 1;
constexpr int kGateClosed = 2;

struct CopyGate {
  const long long* table = nullptr;  // nullptr: no gate
  int* state = nullptr;              // int32 [2]
  int rows = 0;
  int cols = 0;
  int rank = 0;
};

// Queues src[i] -> dst[i] (bytes[i] bytes each) on `stream` of `device`: one launch per 64
// copies, every SM copying chunks of `chunk_bytes`. Any address the device can reach works as
// either end, also a peer GPU's memory mapped into this one (symmetric memory), so one launch
// pushes rows to several peers. Sources and destinations must not overlap. `blocks_per_sm`
// blocks of 512 threads per SM. Throws std::invalid_argument for bad sizes, std::runtime_error
// for CUDA errors. With a `gate`, every launch copies only if the gate passes.
void copy_rows(int device, const std::vector<std::uintptr_t>& src,
               const std::vector<std::uintptr_t>& dst, const std::vector<std::int64_t>& bytes,
               int blocks_per_sm, std::int64_t chunk_bytes, std::uintptr_t stream,
               const CopyGate& gate = CopyGate{});

// Closes the gate of `state` unless a launch claimed it, on a new stream that waits for nothing
// else, and returns the state it found: kGateClaimed if the gated copies had begun (they run to
// completion), else they never will. Blocks until the device answers.
int close_gate(int device, std::uintptr_t state);

// Loads the kernels of gated copies on `device` now, once per device. CUDA loads a kernel when
// it is first used, and loading waits for the work running on the device: close_gate, called
// while an all-reduce may never complete, must not be the first use.
void load_gate_kernels(int device);

// A new CUDA stream of `device` that waits for no other stream (cudaStreamNonBlocking) and that
// nothing else uses, unlike torch's pooled streams; never destroyed. Also loads the gate's
// kernels (load_gate_kernels).
std::uintptr_t new_stream(int device);

}  // namespace eplb
