// count_idx: per-expert token counts of a flattened idx tensor, plus their inclusive running
// totals over n_sms consecutive chunks (DeepSeek LPLB's workload_by_sm; map_idx derives each
// chunk's global token order from it). Two kernels: one block per chunk builds a shared-memory
// histogram, then a column scan turns the per-chunk histograms into running totals in place.
// Deterministic: no result depends on atomic order.
#include "common.cuh"
#include "kernels.cuh"

namespace lplb {
namespace {

constexpr int kHistThreads = 512;
constexpr int kUnroll = 4;
constexpr int kScanTile = 32;  // experts per scan block (one warp wide, coalesced over experts)
constexpr int kScanSlices = 32;  // chunk ranges per scan block, scanned through shared memory

template <typename T>
__global__ void __launch_bounds__(kHistThreads)
    chunk_histogram_kernel(const T* __restrict__ idx, std::int64_t n, std::int64_t chunk,
                           int n_logical, std::int32_t* __restrict__ workload_by_sm,
                           std::int32_t* __restrict__ error_flag) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < n_logical; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  wait_for_inputs();  // idx, and the previous call's readers of workload_by_sm
  allow_dependents();

  const std::int64_t begin = blockIdx.x * chunk;
  const std::int64_t end = begin + chunk < n ? begin + chunk : n;
  bool bad = false;
  // Loads of kUnroll entries are issued before their atomics so several are in flight.
  for (std::int64_t base = begin + threadIdx.x; base < end;
       base += std::int64_t{kUnroll} * blockDim.x) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t i = base + std::int64_t{u} * blockDim.x;
      v[u] = i < end ? __ldg(idx + i) : T(-1);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v[u] >= 0 && v[u] < n_logical) {
        atomicAdd(&hist[static_cast<int>(v[u])], 1);
      } else if (v[u] != -1) {
        bad = true;
      }
    }
  }
  // Every writer stores the same value, so the unordered stores are benign.
  if (bad) *error_flag = 1;
  __syncthreads();
  std::int32_t* row = workload_by_sm + std::int64_t{blockIdx.x} * n_logical;
  for (int e = threadIdx.x; e < n_logical; e += blockDim.x) row[e] = hist[e];
}

// Block (kScanTile x kScanSlices): thread (x, y) owns expert tile*32 + x and a contiguous range
// of chunks; range sums are scanned in shared memory, then each range is rewritten in place.
__global__ void __launch_bounds__(kScanTile* kScanSlices)
    chunk_prefix_kernel(std::int32_t* __restrict__ workload_by_sm, int n_sms, int n_logical,
                        std::int32_t* __restrict__ workload) {
  __shared__ int part[kScanSlices][kScanTile + 1];
  wait_for_inputs();
  allow_dependents();
  const int e = blockIdx.x * kScanTile + threadIdx.x;
  const int rows = (n_sms + kScanSlices - 1) / kScanSlices;
  const int s0 = threadIdx.y * rows;
  const int s1 = s0 + rows < n_sms ? s0 + rows : n_sms;
  int sum = 0;
  if (e < n_logical) {
    for (int s = s0; s < s1; ++s) sum += workload_by_sm[std::int64_t{s} * n_logical + e];
  }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0) {
    int run = 0;
    for (int k = 0; k < kScanSlices; ++k) {
      const int c = part[k][threadIdx.x];
      part[k][threadIdx.x] = run;
      run += c;
    }
    if (e < n_logical) workload[e] = run;
  }
  __syncthreads();
  if (e < n_logical) {
    int run = part[threadIdx.y][threadIdx.x];
    for (int s = s0; s < s1; ++s) {
      std::int32_t* p = workload_by_sm + std::int64_t{s} * n_logical + e;
      run += *p;
      *p = run;
    }
  }
}

}  // namespace

void launch_count_idx(const void* idx, bool idx_int64, std::int64_t n, int n_logical, int n_sms,
                      std::int32_t* workload, std::int32_t* workload_by_sm,
                      std::int32_t* error_flag, cudaStream_t stream) {
  const std::int64_t chunk = n == 0 ? 0 : (n + n_sms - 1) / n_sms;
  const size_t smem = sizeof(int) * static_cast<size_t>(n_logical);
  dispatch_index_type(idx_int64, [&](auto tag) {
    using T = decltype(tag);
    launch("count_idx/chunk_histogram_kernel", chunk_histogram_kernel<T>, n_sms, kHistThreads,
           smem, stream, static_cast<const T*>(idx), n, chunk, n_logical, workload_by_sm,
           error_flag);
  });
  const dim3 block(kScanTile, kScanSlices);
  const int grid = (n_logical + kScanTile - 1) / kScanTile;
  launch("count_idx/chunk_prefix_kernel", chunk_prefix_kernel, grid, block, 0, stream,
         workload_by_sm, n_sms, n_logical, workload);
}

}  // namespace lplb
