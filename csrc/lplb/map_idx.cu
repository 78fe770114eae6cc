// map_idx: send every token of a replicated expert either to the original or to the replica.
// Token k (global flattened order among the tokens of expert e) goes to the original iff
// floor((k + 1) x + 0.5) > floor(k x + 0.5), x = the original's share (docs/lp.md). The global
// order comes from count_idx's running totals over chunks, so every block works on its own
// chunk with no inter-block synchronisation, and the result is deterministic:
//   pass 1: each warp counts the experts of its contiguous sub-chunk (shared memory), keeping
//           the first tokens in registers for pass 2;
//   scan:   per replicated expert, exclusive prefix over warps, offset by the running totals
//           of the chunks before the block's;
//   pass 2: each warp walks its sub-chunk in order, 32 tokens at a time, ranking equal experts
//           inside the warp with __match_any_sync and advancing its private running counts.
#include "common.cuh"
#include "kernels.cuh"

namespace lplb {
namespace {

constexpr int kMaxMapWarps = 32;
constexpr int kMapSmemBudget = 48 * 1024;  // default dynamic shared-memory limit, no opt-in
// Batches of 32 tokens a warp keeps in registers from pass 1 to pass 2 (8 x 32 x 32 warps =
// 8192 tokens per block); longer sub-chunks re-read the rest.
constexpr int kMapBatches = 8;

// Shared memory per logical expert, one 16-byte load per token: the share as float bits, the
// original's and the replica's physical slots, and whether the expert is replicated.
constexpr int kPerExpertBytes = sizeof(int4);

template <typename T>
__global__ void __launch_bounds__(kMaxMapWarps * 32)
    map_idx_kernel(const T* __restrict__ idx, std::int64_t n, std::int64_t chunk,
                   T* __restrict__ out, const float* __restrict__ probs, std::int64_t n_probs,
                   const std::int32_t* __restrict__ workload_by_sm, int n_logical,
                   const std::int32_t* __restrict__ log2phy,
                   const std::int32_t* __restrict__ prob_index,
                   std::int32_t* __restrict__ error_flag) {
  extern __shared__ __align__(16) unsigned char smem[];
  int4* experts = reinterpret_cast<int4*>(smem);  // [E] (share, original, replica, replicated)
  int* counts = reinterpret_cast<int*>(experts + n_logical);  // [warps, E]

  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Tokens of each expert in the chunks before this block's: the previous running-total row.
  const std::int32_t* prefix =
      blockIdx.x == 0 ? nullptr : workload_by_sm + std::int64_t{blockIdx.x - 1} * n_logical;

  // The layout maps first (no kernel of a call writes them), then, once the kernels before have
  // finished, every other global load that nothing else waits for, so that the latencies of the
  // per-expert inputs and of the tokens overlap instead of adding up.
  const int e0 = threadIdx.x;
  int pi0 = -1, prefix0 = 0;
  int2 slots0 = make_int2(-1, -1);
  if (e0 < n_logical) {
    pi0 = prob_index[e0];
    slots0 = make_int2(log2phy[2 * e0], log2phy[2 * e0 + 1]);
  }
  for (int i = threadIdx.x; i < warps * n_logical; i += blockDim.x) counts[i] = 0;
  wait_for_inputs();  // idx, probs, workload_by_sm, and the previous readers of out
  allow_dependents();
  if (e0 < n_logical) prefix0 = prefix ? prefix[e0] : 0;
  const std::int64_t begin = blockIdx.x * chunk;
  const std::int64_t end = begin + chunk < n ? begin + chunk : n;
  const std::int64_t len = end > begin ? end - begin : 0;
  const std::int64_t sub = (len + warps - 1) / warps;
  const std::int64_t wbegin = begin + warp * sub;
  const std::int64_t wend = wbegin + sub < end ? wbegin + sub : end;
  T held[kMapBatches];
#pragma unroll
  for (int u = 0; u < kMapBatches; ++u) {
    const std::int64_t i = wbegin + 32 * u + lane;
    held[u] = i < wend ? __ldg(idx + i) : T(-1);
  }
  __syncthreads();

  // Pass 1: per-warp counts of every valid expert in the warp's sub-chunk.
  int* my_counts = counts + warp * n_logical;
  bool bad = false;
  auto count = [&](T v) {
    if (v >= 0 && v < n_logical) {
      atomicAdd(&my_counts[static_cast<int>(v)], 1);
    } else if (v != -1) {
      bad = true;
    }
  };
#pragma unroll
  for (int u = 0; u < kMapBatches; ++u) count(held[u]);
  for (std::int64_t i = wbegin + 32 * kMapBatches + lane; i < wend; i += 32) count(__ldg(idx + i));
  // Every writer stores the same value, so the unordered stores are benign.
  if (bad) *error_flag = 1;
  __syncthreads();

  // Per expert: its share and slots into shared memory, and for replicated experts the
  // exclusive prefix over warps, offset by the tokens of the chunks before this block.
  for (int e = threadIdx.x; e < n_logical; e += blockDim.x) {
    const bool first = e == e0;
    const int pi = first ? pi0 : prob_index[e];
    const bool replicated = pi >= 0 && pi < n_probs;
    const float x = replicated ? probs[pi] : 0.0f;
    const int2 slots = first ? slots0 : make_int2(log2phy[2 * e], log2phy[2 * e + 1]);
    experts[e] = make_int4(__float_as_int(x), slots.x, slots.y, replicated);
    if (!replicated) continue;
    int run = first ? prefix0 : (prefix ? prefix[e] : 0);
    for (int w = 0; w < warps; ++w) {
      const int c = counts[w * n_logical + e];
      counts[w * n_logical + e] = run;
      run += c;
    }
  }
  __syncthreads();

  // Pass 2: each warp walks its sub-chunk in order, 32 tokens at a time.
  const unsigned lower_lanes = (1u << lane) - 1u;
  auto route = [&](T v, std::int64_t i) {
    const bool valid = v >= 0 && v < n_logical;
    const int e = valid ? static_cast<int>(v) : 0;
    const int4 info = experts[e];
    const double x = static_cast<double>(__int_as_float(info.x));  // exact widening
    const bool replicated = valid && info.w != 0;
    // Lanes without a replicated expert get distinct negative keys so they match nobody.
    const unsigned group = __match_any_sync(kFullMask, replicated ? e : -1 - lane);
    int k = 0;
    if (replicated) k = my_counts[e] + __popc(group & lower_lanes);
    __syncwarp();
    // The highest lane of each group advances the warp's running count past the group.
    if (replicated && (group >> lane) == 1u) my_counts[e] = k + 1;
    __syncwarp();
    if (i >= wend) return;
    T target = T(-1);
    if (valid) {
      target = info.y;
      if (replicated) {
        // Separate round-to-nearest multiply and add (no FMA contraction): the CPU reference
        // evaluates the same two roundings, and the decision must match it bit for bit.
        const double kd = static_cast<double>(k);
        const double lo = floor(__dadd_rn(__dmul_rn(kd, x), 0.5));
        const double hi = floor(__dadd_rn(__dmul_rn(kd + 1.0, x), 0.5));
        target = hi > lo ? info.y : info.z;
      }
    }
    out[i] = target;
  };
#pragma unroll
  for (int u = 0; u < kMapBatches; ++u) {
    if (wbegin + 32 * u >= wend) break;  // uniform across the warp
    route(held[u], wbegin + 32 * u + lane);
  }
  for (std::int64_t base = wbegin + 32 * kMapBatches; base < wend; base += 32) {
    const std::int64_t i = base + lane;
    route(i < wend ? __ldg(idx + i) : T(-1), i);
  }
}

}  // namespace

void launch_map_idx(const void* idx, bool idx_int64, std::int64_t n, void* out,
                    const float* probs, std::int64_t n_probs,
                    const std::int32_t* workload_by_sm, int n_sms, int n_logical,
                    const std::int32_t* log2phy, const std::int32_t* prob_index,
                    std::int32_t* error_flag, cudaStream_t stream) {
  const int per_warp = static_cast<int>(sizeof(int)) * n_logical;
  const int fixed = kPerExpertBytes * n_logical;
  int warps = (kMapSmemBudget - fixed) / per_warp;
  if (warps > kMaxMapWarps) warps = kMaxMapWarps;
  if (warps < 1) {
    throw std::invalid_argument("map_idx: n_logical=" + std::to_string(n_logical) +
                                " needs more shared memory than one block has");
  }
  const size_t smem = static_cast<size_t>(fixed) + static_cast<size_t>(warps) * per_warp;
  const std::int64_t chunk = n == 0 ? 0 : (n + n_sms - 1) / n_sms;
  dispatch_index_type(idx_int64, [&](auto tag) {
    using T = decltype(tag);
    launch("map_idx_kernel", map_idx_kernel<T>, n_sms, warps * 32, smem, stream,
           static_cast<const T*>(idx), n, chunk, static_cast<T*>(out), probs, n_probs,
           workload_by_sm, n_logical, log2phy, prob_index, error_flag);
  });
}

}  // namespace lplb
