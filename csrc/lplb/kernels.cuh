// Host-side launchers of the CUDA kernels. They take raw device pointers, sizes and a stream, so
// the extension never links libtorch; Python (lplb/cuda_ops.py) validates shapes and dtypes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lplb {

// Dtype codes of the solve kernel's workload input.
enum class WorkloadType : int { kInt32 = 0, kInt64 = 1, kFloat32 = 2, kFloat64 = 3 };

// idx: n entries (int32 or int64). workload: int32 [n_logical]; workload_by_sm: int32
// [n_sms, n_logical] (inclusive running totals over the n_sms chunks of ceil(n / n_sms) entries);
// error_flag: int32 [1], set to 1 when an entry lies outside [-1, n_logical).
void launch_count_idx(const void* idx, bool idx_int64, std::int64_t n, int n_logical, int n_sms,
                      std::int32_t* workload, std::int32_t* workload_by_sm,
                      std::int32_t* error_flag, cudaStream_t stream);

struct SolveArgs {
  const void* workload;  // [n_logical] of workload_type
  WorkloadType workload_type;
  int n_logical;
  const std::int32_t* phy2log;  // [n_physical]
  std::int64_t n_physical;
  const std::int32_t* r2o;  // [group_size, n_sets]
  const std::int32_t* o2r;  // [group_size, n_sets]
  void* avail_counter;      // one int32 or int64
  bool avail_int64;
  int group_size;
  int n_sets;  // D
  int n_group;
  int n_local_logical;
  int n_local_routed;
  int n_combined;  // C
  float* probs;    // [n_group, group_size, n_sets]
};

void launch_solve(const SolveArgs& args, cudaStream_t stream);

// idx/out: n entries of the same integer type; probs: float32 (flat); workload_by_sm: int32
// [n_sms, n_logical] running totals; log2phy: int32 [n_logical, 2]; prob_index: int32
// [n_logical]; error_flag: int32 [1], set to 1 when an entry lies outside [-1, n_logical).
void launch_map_idx(const void* idx, bool idx_int64, std::int64_t n, void* out,
                    const float* probs, std::int64_t n_probs,
                    const std::int32_t* workload_by_sm, int n_sms, int n_logical,
                    const std::int32_t* log2phy, const std::int32_t* prob_index,
                    std::int32_t* error_flag, cudaStream_t stream);

}  // namespace lplb
