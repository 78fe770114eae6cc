// NVSHMEM workload exchange of the module lplb._nvshmem (docs/exchange.md): every rank puts its
// per-expert counts into every peer's symmetric buffer with a signal, waits for its peers'
// signals and sums in device code, on the caller's stream, so a CUDA graph can hold it.
//
// This header has no NVSHMEM types: the pybind11 bindings (exchange_bindings.cpp) include it
// without the NVSHMEM headers. Only exchange.cu, compiled with relocatable device code and
// device-linked against libnvshmem_device.a, talks to NVSHMEM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

namespace lplb::exchange {

// Symmetric buffers of one exchange (one Planner), allocated collectively by allocate().
struct Buffers {
  std::int32_t* recv = nullptr;     // [2 parities][world][n]: slot [parity][source rank]
  std::uint64_t* signal = nullptr;  // [2 parities][world]: last sequence number put by a source
  std::int32_t* send = nullptr;     // [n]: this rank's counts, the source of its puts
  std::uint64_t* words = nullptr;   // [2 parities][world][n]: (sequence << 32 | count) words of
                                    // the load/store protocol, slot [parity][source]
  int n = 0;                        // experts per workload
  int rank = 0;                     // this PE
  int world = 0;                    // number of PEs
  bool load_store = false;          // the load/store protocol, else put with signal (exchange.cu)
};

// NVSHMEM's unique id (nvshmemx_get_uniqueid) as opaque bytes, to be broadcast from rank 0.
std::string unique_id();

// nvshmemx_init_status() of the NVSHMEM host library this process loaded.
int init_status();

// Initialise NVSHMEM on `device` with the unique-id bootstrap: PE `rank` of `world`. Returns
// (my PE, number of PEs). Throws std::runtime_error if NVSHMEM reports a failure.
std::pair<int, int> init(int device, const std::string& uid, int rank, int world);

// Attach this module to an NVSHMEM runtime another library of the process (DeepEP) already
// initialised: registers this module's device state with the shared host library; no bootstrap.
std::pair<int, int> attach(int device);

// Collective over all PEs: allocate and zero the symmetric buffers for workloads of n experts.
// The exchange uses the load/store protocol when `allow_load_store` and every peer is reachable
// by loads and stores (NVLink or PCIe P2P), else put with signal.
Buffers allocate(int device, int n, bool allow_load_store);

// Sum `input` [n] int32 over all PEs into `output` [n] int32 on `stream`. `sequence` is this
// exchange's call counter (one uint64 in device memory, zero before the first call); the kernel
// increments it, so consecutive calls and CUDA-graph replays need no host involvement.
void launch_sum(int device, const Buffers& buffers, const std::int32_t* input,
                std::int32_t* output, std::uint64_t* sequence, cudaStream_t stream);

// nvshmem_finalize() for this module's registration (collective over all PEs).
void finalize();

// NVSHMEM version this module was compiled against, and that of the loaded host library.
std::string build_version();
std::string runtime_version();

}  // namespace lplb::exchange
