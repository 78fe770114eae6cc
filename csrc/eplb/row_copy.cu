// One kernel for the many row copies of an expert move (docs/moves.md): the pushes of a
// synchronous move into its peers' staging, and its commit. As separate copies each costs a
// launch and host time, and the copy engine of a peer copy reaches less of NVLink than the SMs
// do; a synchronous move stalls the model anyway, so its copies may take every SM.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <set>

#include "common/cuda_checks.h"
#include "common/pointers.h"
#include "row_copy.h"

namespace eplb {
namespace {

constexpr int kMaxCopies = 64;  // per launch: the batch travels as a kernel parameter (< 4 KiB)
constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // vectors in flight per thread: loads of peer memory take long

struct CopyBatch {
  CopyGate gate;  // gate.table == nullptr: no gate
  const unsigned char* src[kMaxCopies];
  unsigned char* dst[kMaxCopies];
  long long bytes[kMaxCopies];
  long long first_chunk[kMaxCopies + 1];  // chunks of copies before copy k
  long long chunk_bytes;
  int count;
};

void check_cuda(cudaError_t err, const char* what) { common::check_cuda(err, "eplb", what); }

// Copies n bytes as vectors V (src, dst and n are multiples of sizeof(V)).
template <typename V>
__device__ __forceinline__ void copy_span(const unsigned char* src, unsigned char* dst,
                                          long long n) {
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  const long long count = n / static_cast<long long>(sizeof(V));
  long long i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < count; i += kUnroll * kThreads) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = s[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + u * kThreads] = v[u];
  }
  for (; i < count; i += kThreads) d[i] = s[i];
}

// Whether a launch through `gate` may copy (row_copy.h): the table agrees, and the gate is
// claimed now or was before -- not closed. Every block asks; the first claim decides for all.
__device__ bool gate_passes(const CopyGate& gate) {
  const long long* mine = gate.table + static_cast<long long>(gate.rank) * gate.cols;
  if (mine[0] != 1) return false;
  for (long long i = 0; i < static_cast<long long>(gate.rows) * gate.cols; ++i) {
    if (gate.table[i] != mine[i % gate.cols]) return false;
  }
  return atomicCAS(gate.state, kGateOpen, kGateClaimed) != kGateClosed;
}

// Block b copies chunks b, b + gridDim.x, ... of the concatenated copies, so that at any time
// the blocks work on neighbouring chunks: copies go one after another, as the caller ordered
// them, each spread over every SM.
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const __grid_constant__ CopyBatch batch) {
  if (batch.gate.table != nullptr) {
    __shared__ bool pass;
    if (threadIdx.x == 0) pass = gate_passes(batch.gate);
    __syncthreads();
    if (!pass) return;
  }
  const long long total = batch.first_chunk[batch.count];
  int k = 0;
  for (long long chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (batch.first_chunk[k + 1] <= chunk) ++k;  // chunks only grow: k never goes back
    const long long begin = (chunk - batch.first_chunk[k]) * batch.chunk_bytes;
    const long long n = min(batch.chunk_bytes, batch.bytes[k] - begin);
    const unsigned char* s = batch.src[k] + begin;
    unsigned char* d = batch.dst[k] + begin;
    const auto bits = reinterpret_cast<std::uintptr_t>(s) | reinterpret_cast<std::uintptr_t>(d) |
                      static_cast<std::uintptr_t>(n);
    if (bits % 16 == 0) {
      copy_span<uint4>(s, d, n);
    } else if (bits % 8 == 0) {
      copy_span<uint2>(s, d, n);
    } else if (bits % 4 == 0) {
      copy_span<unsigned>(s, d, n);
    } else {
      copy_span<unsigned char>(s, d, n);
    }
  }
}

__global__ void close_gate_kernel(int* state) {
  state[1] = atomicCAS(state, kGateOpen, kGateClosed);
}

// Makes `device` current for its lifetime, then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// A new stream of the current device that waits for no other stream.
cudaStream_t nonblocking_stream() {
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  return stream;
}

void launch(CopyBatch& batch, int blocks, cudaStream_t stream) {
  if (batch.count == 0) return;
  const long long total = batch.first_chunk[batch.count];
  const int grid = static_cast<int>(std::min<long long>(blocks, total));
  copy_rows_kernel<<<grid, kThreads, 0, stream>>>(batch);
  check_cuda(cudaGetLastError(), "copy_rows_kernel");
  batch.count = 0;
}

}  // namespace

void copy_rows(int device, const std::vector<std::uintptr_t>& src,
               const std::vector<std::uintptr_t>& dst, const std::vector<std::int64_t>& bytes,
               int blocks_per_sm, std::int64_t chunk_bytes, std::uintptr_t stream,
               const CopyGate& gate) {
  common::require(src.size() == dst.size() && src.size() == bytes.size(),
                  "copy_rows: src, dst and bytes must have the same length");
  if (gate.table != nullptr) {
    common::require(gate.state != nullptr, "copy_rows: a gate needs its state");
    common::require(gate.rows > 0 && gate.cols > 0, "copy_rows: the gate's table is empty");
    common::require(0 <= gate.rank && gate.rank < gate.rows,
                    "copy_rows: the gate's rank is not a row of its table");
  }
  common::require(chunk_bytes > 0 && chunk_bytes % 16 == 0,
                  "copy_rows: chunk_bytes must be a positive multiple of 16");
  common::require(blocks_per_sm > 0, "copy_rows: blocks_per_sm must be positive");
  for (std::size_t i = 0; i < src.size(); ++i) {
    common::require(bytes[i] >= 0, "copy_rows: bytes must be >= 0");
    common::require(bytes[i] == 0 || (src[i] != 0 && dst[i] != 0),
                    "copy_rows: null address for a non-empty copy");
  }
  // Launch on the tensors' device, and leave the thread's current device as it was (torch's
  // runtime reads the same driver context).
  const DeviceGuard guard(device);
  const int sms = common::device_attribute(cudaDevAttrMultiProcessorCount, device, "eplb");
  const int blocks = std::max(1, sms * blocks_per_sm);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  CopyBatch batch{};
  batch.gate = gate;
  batch.chunk_bytes = chunk_bytes;
  for (std::size_t i = 0; i < src.size(); ++i) {
    if (bytes[i] == 0) continue;
    const int k = batch.count;
    batch.src[k] = common::address<const unsigned char>(src[i]);
    batch.dst[k] = common::address<unsigned char>(dst[i]);
    batch.bytes[k] = bytes[i];
    batch.first_chunk[k + 1] = batch.first_chunk[k] + (bytes[i] + chunk_bytes - 1) / chunk_bytes;
    if (++batch.count == kMaxCopies) launch(batch, blocks, cuda_stream);
  }
  launch(batch, blocks, cuda_stream);
}

void load_gate_kernels(int device) {
  static std::mutex mutex;
  static std::set<int> loaded;
  const std::lock_guard<std::mutex> lock(mutex);
  if (loaded.count(device)) return;
  const DeviceGuard guard(device);
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, copy_rows_kernel), "cudaFuncGetAttributes");
  check_cuda(cudaFuncGetAttributes(&attributes, close_gate_kernel), "cudaFuncGetAttributes");
  loaded.insert(device);
}

std::uintptr_t new_stream(int device) {
  load_gate_kernels(device);
  const DeviceGuard guard(device);
  return reinterpret_cast<std::uintptr_t>(nonblocking_stream());
}

int close_gate(int device, std::uintptr_t state) {
  common::require(state != 0, "close_gate: null state");
  const DeviceGuard guard(device);
  // A stream of its own, made now: any stream that existed may be queued behind the gated
  // launches (torch hands out pooled streams to many users), and the answer must not wait.
  cudaStream_t stream = nonblocking_stream();
  int* device_state = common::address<int>(state);
  int answer = -1;
  close_gate_kernel<<<1, 1, 0, stream>>>(device_state);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(&answer, device_state + 1, sizeof(int), cudaMemcpyDeviceToHost, stream);
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  check_cuda(err, "close_gate");
  return answer;
}

}  // namespace eplb
