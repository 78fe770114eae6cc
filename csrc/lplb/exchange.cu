// NVSHMEM workload exchange: the device-side sum of every rank's per-expert counts
// (docs/exchange.md). Compiled only into lplb._nvshmem, with relocatable device code and a
// device link against libnvshmem_device.a (CMakeLists.txt); lplb._C never sees this file.
//
// One call on PE `me` is one block, stream-ordered, with no host involvement. seq = *sequence
// + 1 is the call's number (a device counter of this exchange), p = seq & 1 its parity; all
// buffers are double-buffered by parity. Two protocols:
//
// Load/store (every peer reachable by loads and stores: NVLink or PCIe P2P; `load_store`). Each
// count travels with its call number in one 8-byte word, (uint32(seq) << 32) | uint32(count),
// like the low-latency protocol of collective libraries: an aligned 8-byte store is never torn,
// so a reader that sees its call number in a word also sees that word's count, and no memory
// fence, signal or quiet is needed on either side.
//   1. For every peer q: store my words into q's words[p][me][*] (through nvshmem_ptr).
//   2. For every expert e and peer q: spin on my own words[p][q][e] until its call number is
//      uint32(seq), then sum in the fixed order q = 0..world-1 (my own count for q = me).
//
// Put with signal (a proxy transport such as InfiniBand):
//   1. Copy the input counts to the symmetric `send` buffer (the NIC reads registered memory).
//   2. For every peer q: put the counts into q's recv[p][me] and set q's signal[p][me] = seq
//      (put-with-signal: the signal lands after the data).
//   3. Wait until signal[p][q] >= seq in my own memory for every peer q, then sum as above.
//   4. nvshmem_quiet() (my puts complete, so their source may be rewritten).
// Both end with *sequence = seq. Integer sums: every PE computes bitwise the same total.
//
// Why two parities are enough (no call mixes with another; write-after-read safety):
//   * Call seq of PE q writes only slot [p][q] of each peer, p = seq & 1.
//   * q starts call seq only after its call seq - 1 finished, and that call waited for every
//     peer's data of seq - 1. A peer sends its seq - 1 data at the start of its call seq - 1,
//     i.e. after its call seq - 2 finished (kernels of one stream run one after the other). So
//     when q writes parity p for seq, every peer has finished call seq - 2, the last call that
//     read parity p: the write never lands in a slot a peer is still reading.
//   * Conversely q can be at most one call ahead of me: to start seq + 1 it needs my seq data,
//     which I send only at the start of my call seq. While I wait in call seq, q may already be
//     in call seq + 1, but that call writes the other parity; it cannot reach call seq + 2 (the
//     next user of parity p) before I send my seq + 1 data, after I finished reading call seq.
//   * Hence while I wait in call seq, slot [p][q] holds call seq - 2's data or call seq's, never
//     a later call's: a signal >= seq, or a word tagged uint32(seq) (seq - 2 and seq differ
//     modulo 2^32), means exactly "call seq's data is here".
//   * The puts' source (`send`, or the caller's input) is rewritten only after the quiet of this
//     call; the load/store protocol copies each count into the stored word, so it reads its
//     source only before its own stores.
// All PEs must make the same sequence of calls on one stream each, like any collective.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "exchange.h"

namespace lplb::exchange {
namespace {

constexpr int kThreads = 256;  // 8 warps: up to 8 peers put in parallel, E <= 2048 in 8 steps
constexpr int kWarp = 32;

void check_nvshmem(int status, const char* what) {
  if (status != 0) {
    throw std::runtime_error(std::string("lplb NVSHMEM error in ") + what + ": status " +
                             std::to_string(status) + " (set NVSHMEM_DEBUG=INFO for details)");
  }
}

// A peer's counts, read past the L1 cache: they were written by another GPU (or a NIC).
__device__ __forceinline__ std::int32_t load_remote_written(const std::int32_t* p) {
  return *reinterpret_cast<const volatile std::int32_t*>(p);
}

// output[e] = sum over q = 0..world-1, in that fixed order, of peer q's count of e
// (`peer_count(q, e)`, my own input for q = me). Unsigned arithmetic so that even a wrapped sum
// is well defined and the same on every PE.
template <typename PeerCount>
__device__ __forceinline__ void sum_in_rank_order(const Buffers& b, const std::int32_t* input,
                                                  std::int32_t* output, PeerCount peer_count) {
  for (int e = threadIdx.x; e < b.n; e += blockDim.x) {
    std::uint32_t total = 0;
    for (int q = 0; q < b.world; ++q) {
      total += q == b.rank ? static_cast<std::uint32_t>(input[e]) : peer_count(q, e);
    }
    output[e] = static_cast<std::int32_t>(total);
  }
}

// Load/store protocol (see the top of the file): words to every peer, then spin and sum.
__device__ __forceinline__ void sum_load_store(const Buffers& b, const std::int32_t* input,
                                               std::int32_t* output, std::uint64_t seq) {
  const int tid = threadIdx.x;
  const auto tag = static_cast<std::uint32_t>(seq);
  const std::size_t parity_offset = static_cast<std::size_t>(seq & 1u) * b.world * b.n;
  std::uint64_t* slots = b.words + parity_offset;  // [world][n] of this parity
  // My slot in every peer's buffer; peers in staggered order so the PEs do not all write to
  // PE 0 first.
  std::uint64_t* mine = slots + static_cast<std::size_t>(b.rank) * b.n;
  for (int i = 1; i < b.world; ++i) {
    const int peer = (b.rank + i) % b.world;
    auto* dst = static_cast<volatile std::uint64_t*>(nvshmem_ptr(mine, peer));
    for (int e = tid; e < b.n; e += blockDim.x) {
      dst[e] = (std::uint64_t{tag} << 32) | static_cast<std::uint32_t>(input[e]);
    }
  }
  sum_in_rank_order(b, input, output, [&](int q, int e) {
    const volatile std::uint64_t* src = slots + static_cast<std::size_t>(q) * b.n + e;
    std::uint64_t word = *src;
    while (static_cast<std::uint32_t>(word >> 32) != tag) word = *src;
    return static_cast<std::uint32_t>(word);
  });
}

// Put-with-signal protocol (see the top of the file), for peers behind a proxy transport.
__device__ __forceinline__ void sum_put_signal(const Buffers& b, const std::int32_t* input,
                                               std::int32_t* output, std::uint64_t seq) {
  const int tid = threadIdx.x;
  for (int e = tid; e < b.n; e += blockDim.x) b.send[e] = input[e];
  __threadfence_system();
  __syncthreads();

  const int parity = static_cast<int>(seq & 1u);
  std::int32_t* slots = b.recv + static_cast<std::size_t>(parity) * b.world * b.n;
  std::uint64_t* signals = b.signal + static_cast<std::size_t>(parity) * b.world;

  // Warp w writes to peers me + 1 + w, me + 1 + w + 8, ... (staggered, as above).
  const int warp = tid / kWarp;
  const int n_warps = blockDim.x / kWarp;
  for (int i = warp; i < b.world - 1; i += n_warps) {
    const int peer = (b.rank + 1 + i) % b.world;
    nvshmemx_int32_put_signal_nbi_warp(slots + static_cast<std::size_t>(b.rank) * b.n, b.send,
                                       b.n, signals + b.rank, seq, NVSHMEM_SIGNAL_SET, peer);
  }
  // One thread per peer; wait_until orders the later loads after the signal.
  for (int q = tid; q < b.world; q += blockDim.x) {
    if (q != b.rank) nvshmem_uint64_wait_until(signals + q, NVSHMEM_CMP_GE, seq);
  }
  __syncthreads();

  sum_in_rank_order(b, input, output, [&](int q, int e) {
    return static_cast<std::uint32_t>(
        load_remote_written(slots + static_cast<std::size_t>(q) * b.n + e));
  });
  __syncthreads();  // every warp has issued its puts before thread 0 waits for their completion
  if (tid == 0) nvshmem_quiet();
}

__global__ void __launch_bounds__(kThreads)
    sum_kernel(Buffers b, const std::int32_t* __restrict__ input, std::int32_t* __restrict__ output,
               std::uint64_t* __restrict__ sequence) {
  // Every thread reads the counter itself: thread 0 rewrites it only at the very end, after the
  // last __syncthreads, so all threads see the same value without a barrier here.
  const std::uint64_t seq = *sequence + 1;
  if (b.load_store) {
    sum_load_store(b, input, output, seq);
  } else {
    sum_put_signal(b, input, output, seq);
  }
  __syncthreads();
  if (threadIdx.x == 0) *sequence = seq;
}

// nvshmemx_init_attr() with the status returned instead of exit(): nvshmemx_init_attr is an
// inline wrapper around nvshmemi_init_thread that terminates the process on failure, which would
// take the Python interpreter down without a traceback.
void init_thread(unsigned int flags, nvshmemx_init_attr_t* attr) {
  if (attr != nullptr) nvshmemx_init_init_attr_ver_only((*attr));
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  check_nvshmem(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, flags, attr, version),
                "nvshmemi_init_thread");
}

template <typename T>
T* symmetric_zeros(std::size_t count, const char* what) {
  void* ptr = nvshmem_malloc(count * sizeof(T));
  if (ptr == nullptr) {
    throw std::runtime_error(std::string("lplb NVSHMEM error: nvshmem_malloc of ") + what +
                             " failed (symmetric heap exhausted? see NVSHMEM_SYMMETRIC_SIZE)");
  }
  check_cuda(cudaMemset(ptr, 0, count * sizeof(T)), "cudaMemset");
  return static_cast<T*>(ptr);
}

}  // namespace

std::string unique_id() {
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  check_nvshmem(nvshmemx_get_uniqueid(&uid), "nvshmemx_get_uniqueid");
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

int init_status() { return nvshmemx_init_status(); }

std::pair<int, int> init(int device, const std::string& uid_bytes, int rank, int world) {
  if (uid_bytes.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("NVSHMEM unique id must have " +
                                std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
                                std::to_string(uid_bytes.size()));
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, uid_bytes.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  check_nvshmem(nvshmemx_set_attr_uniqueid_args(rank, world, &uid, &attr),
                "nvshmemx_set_attr_uniqueid_args");
  init_thread(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  return {nvshmem_my_pe(), nvshmem_n_pes()};
}

std::pair<int, int> attach(int device) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  if (nvshmemx_init_status() == NVSHMEM_STATUS_NOT_INITIALIZED) {
    throw std::runtime_error(
        "NVSHMEM is not initialised in this process as seen by lplb's NVSHMEM host library "
        "(libnvshmem_host.so.3): the library that initialised it must load the same shared "
        "libnvshmem_host.so.3 (a statically linked NVSHMEM keeps its own state)");
  }
  // Already bootstrapped: NVSHMEM skips the bootstrap, registers this module's device state and
  // copies the running state into it (flags and attributes are ignored).
  init_thread(0, nullptr);
  return {nvshmem_my_pe(), nvshmem_n_pes()};
}

Buffers allocate(int device, int n, bool allow_load_store) {
  if (n < 1) throw std::invalid_argument("NVSHMEM exchange needs n >= 1, got " + std::to_string(n));
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  Buffers b;
  b.n = n;
  b.rank = nvshmem_my_pe();
  b.world = nvshmem_n_pes();
  const auto world = static_cast<std::size_t>(b.world);
  b.recv = symmetric_zeros<std::int32_t>(2 * world * n, "the receive slots");
  b.signal = symmetric_zeros<std::uint64_t>(2 * world, "the signal words");
  b.send = symmetric_zeros<std::int32_t>(n, "the send buffer");
  b.words = symmetric_zeros<std::uint64_t>(2 * world * n, "the load/store words");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  // No PE may put into a peer before that peer has zeroed its signal words.
  nvshmem_barrier_all();
  b.load_store = allow_load_store;
  for (int pe = 0; pe < b.world; ++pe) {
    if (nvshmem_ptr(b.words, pe) == nullptr) b.load_store = false;
  }
  return b;
}

void launch_sum(int device, const Buffers& buffers, const std::int32_t* input,
                std::int32_t* output, std::uint64_t* sequence, cudaStream_t stream) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  sum_kernel<<<1, kThreads, 0, stream>>>(buffers, input, output, sequence);
  check_launch("lplb NVSHMEM exchange kernel");
}

void finalize() { nvshmem_finalize(); }

std::string build_version() {
  return std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." +
         std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "." +
         std::to_string(NVSHMEM_VENDOR_PATCH_VERSION);
}

std::string runtime_version() {
  int major = 0, minor = 0, patch = 0;
  nvshmemx_vendor_get_version_info(&major, &minor, &patch);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace lplb::exchange
