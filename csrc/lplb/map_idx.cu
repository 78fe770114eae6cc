// map_idx: send every token of a replicated expert either to the original or to the replica.
// Token k (global flattened order among the tokens of expert e) goes to the original iff
// floor((k + 1) x + 0.5) > floor(k x + 0.5), x = the original's share (docs/lp.md). The global
// order comes from count_idx's running totals over chunks, so every block works on its own
// chunk with no inter-block synchronisation, and the result is deterministic. A block walks its
// chunk in rounds of up to 256 entries per warp, each warp owning a contiguous part:
//   compact: each warp loads its entries into registers, writes every one's original slot (or
//            -1) to out at once, so that whole sectors are stored while the block ranks, and
//            lists, in order, the replicated ids of its replicated entries in shared memory (the
//            other entries need no rank);
//   rank:    each warp ranks its list 32 entries at a time: lanes of one expert are grouped by
//            ballots over the bits of the replicated id, ranked by the popcount of lower lanes,
//            and the highest lane advances the warp's running count of the expert;
//   scan:    per replicated expert, exclusive prefix over warps, offset by the running totals
//            of the chunks (and rounds) before;
//   route:   each warp rewrites its replicated entries, whose rank is the warp's offset plus
//            the rank in the list.
// Only replicated entries (a quarter in a typical layout) take the per-entry shared-memory
// traffic of the ranking, and no instruction serialises on equal keys (__match_any_sync does).
#include <mutex>
#include <unordered_map>

#include "common.cuh"
#include "kernels.cuh"

namespace lplb {
namespace {

constexpr int kMaxMapWarps = 32;
// Batches of 32 entries a warp holds in registers per round; a rank within a round fits a short.
constexpr int kMapBatches = 8;
constexpr int kRoundEntries = 32 * kMapBatches;
constexpr int kTotals = 36;

// Shared memory, in this order (every region a multiple of 16 bytes or last):
//   rep_info  int4  [E]  per replicated id: (share index, then the share's bits; replica slot;
//                        original slot; expert)
//   route     int2  [E]  per expert: (original slot, replicated id or -1)
//   base      int   [E]  per replicated id: tokens of the expert before the round
//   counts    int   [warps, R | 1]  per warp running counts, then the warp's offsets
//   totals    int   [36] scratch of the replicated-id scan (33 used)
//   list      short [warps, 256]  the warp's replicated ids, then their ranks
struct MapSmem {
  static constexpr size_t fixed(int n_logical) {
    return static_cast<size_t>(n_logical) * (16 + 8 + 4) + kTotals * sizeof(int);
  }
  static constexpr size_t per_warp(int n_logical) {
    return static_cast<size_t>(n_logical + 1) * sizeof(int) + kRoundEntries * sizeof(short);
  }
};

// Lanes whose `key` (below 2^bits) equals this lane's, among the active lanes; {this lane} for an
// inactive one. Ballots over the key bits: full-rate votes instead of the serialised match.
__device__ __forceinline__ unsigned lanes_with_key(int key, bool active, int bits, int lane) {
  unsigned peers = __ballot_sync(kFullMask, active);
  for (int b = 0; b < bits; ++b) {
    const bool set = (key >> b) & 1;
    const unsigned votes = __ballot_sync(kFullMask, set);
    peers &= set ? votes : ~votes;
  }
  return active ? peers : 1u << lane;
}

template <typename T>
__global__ void __launch_bounds__(kMaxMapWarps * 32, 1)
    map_idx_kernel(const T* __restrict__ idx, std::int64_t n, std::int64_t chunk,
                   T* __restrict__ out, const float* __restrict__ probs, std::int64_t n_probs,
                   const std::int32_t* __restrict__ workload_by_sm, int n_logical,
                   const std::int32_t* __restrict__ log2phy,
                   const std::int32_t* __restrict__ prob_index,
                   std::int32_t* __restrict__ error_flag) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int E = n_logical;
  int4* rep_info = reinterpret_cast<int4*>(smem);
  int2* route = reinterpret_cast<int2*>(rep_info + E);
  int* base = reinterpret_cast<int*>(route + E);
  int* counts = base + E;
  int* totals = counts + warps * (E + 1);
  short* list = reinterpret_cast<short*>(totals + kTotals);
  const unsigned lower_lanes = (1u << lane) - 1u;

  // Before the wait: the layout maps only (no kernel of a call writes them). Replicated ids are
  // the ranks of the replicated experts in expert order (a block-wide scan of their flags).
  int n_rep = 0;
  for (int tile = 0; tile < E; tile += blockDim.x) {
    const int e = tile + threadIdx.x;
    // All three loads first: one memory latency before the scan, not two.
    const int pi = e < E ? prob_index[e] : -1;
    const int original = e < E ? log2phy[2 * e] : -1;
    const int replica = e < E ? log2phy[2 * e + 1] : -1;
    const bool replicated = pi >= 0 && pi < n_probs;
    const unsigned votes = __ballot_sync(kFullMask, replicated);
    if (lane == 0) totals[warp] = __popc(votes);
    __syncthreads();
    if (warp == 0) {
      const int own = lane < warps ? totals[lane] : 0;
      int incl = own;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += up;
      }
      totals[lane] = incl - own;
      if (lane == 31) totals[32] = incl;  // lanes >= warps add nothing, so this is the sum
    }
    __syncthreads();
    const int r = replicated ? n_rep + totals[warp] + __popc(votes & lower_lanes) : -1;
    if (e < E) route[e] = make_int2(original, r);
    if (replicated) rep_info[r] = make_int4(pi, replica, original, e);
    n_rep += totals[32];
    __syncthreads();  // totals is reused by the next tile
  }
  const int bits = n_rep > 1 ? 32 - __clz(n_rep - 1) : 0;
  const int stride = n_rep | 1;  // odd: the lanes reading one id's counts hit distinct banks
  int* my_counts = counts + warp * stride;
  short* my_list = list + warp * kRoundEntries;

  wait_for_inputs();  // idx, probs, workload_by_sm, and the previous readers of out
  allow_dependents();
  const std::int64_t begin = blockIdx.x * chunk;
  const std::int64_t end = begin + chunk < n ? begin + chunk : n;
  // Tokens of each expert in the chunks before this block's: the previous running-total row.
  const std::int32_t* prefix =
      blockIdx.x == 0 ? nullptr : workload_by_sm + std::int64_t{blockIdx.x - 1} * n_logical;
  bool bad = false;
  for (std::int64_t round = begin; round < end; round += std::int64_t{warps} * kRoundEntries) {
    const std::int64_t round_end =
        end - round < std::int64_t{warps} * kRoundEntries ? end : round + warps * kRoundEntries;
    const std::int64_t sub = (round_end - round + warps - 1) / warps;
    const std::int64_t wbegin = round + warp * sub;
    const std::int64_t wend = wbegin + sub < round_end ? wbegin + sub : round_end;
    T held[kMapBatches];
#pragma unroll
    for (int u = 0; u < kMapBatches; ++u) {
      const std::int64_t i = wbegin + 32 * u + lane;
      held[u] = i < wend ? __ldg(idx + i) : T(-1);
    }
    if (round == begin) {
      // Issued after the token loads so that both latencies overlap; read after the barrier.
      for (int r = threadIdx.x; r < n_rep; r += blockDim.x) {
        const int4 info = rep_info[r];
        rep_info[r].x = __float_as_int(probs[info.x]);
        base[r] = prefix ? prefix[info.w] : 0;
      }
    }
    __syncwarp();  // the previous round's reads of this warp's counts are done
    for (int r = lane; r < n_rep; r += 32) my_counts[r] = 0;

    // Compact: every entry of a non-replicated expert (or -1) is written now; the warp lists the
    // replicated ids of the others, in entry order, and keeps (id, list position) per entry.
    int listed = 0;
    int code[kMapBatches];
#pragma unroll
    for (int u = 0; u < kMapBatches; ++u) {
      const std::int64_t i = wbegin + 32 * u + lane;
      const T v = held[u];
      const bool valid = v >= 0 && v < n_logical;
      bad |= !valid && v != T(-1);
      const int2 slots = valid ? route[static_cast<int>(v)] : make_int2(-1, -1);
      const bool replicated = slots.y >= 0;
      const unsigned votes = __ballot_sync(kFullMask, replicated);
      const int at = listed + __popc(votes & lower_lanes);
      code[u] = replicated ? (slots.y << 8) | at : -1;  // id < 2048, position < 256
      if (replicated) my_list[at] = static_cast<short>(slots.y);
      if (i < wend) out[i] = T(slots.x);  // final unless replicated: whole sectors written now
      listed += __popc(votes);
    }
    __syncwarp();

    // Rank: the list in order, 32 at a time, against the warp's running counts.
    for (int at = 0; at < listed; at += 32) {
      const int j = at + lane;
      const bool active = j < listed;
      const int r = active ? my_list[j] : 0;
      const unsigned peers = lanes_with_key(r, active, bits, lane);
      int k = 0;
      if (active) k = my_counts[r] + __popc(peers & lower_lanes);
      __syncwarp();
      if (active) {
        if ((peers >> lane) == 1u) my_counts[r] = k + 1;  // the group's highest lane
        my_list[j] = static_cast<short>(k);
      }
      __syncwarp();
    }
    __syncthreads();

    // Scan: per replicated id, one warp turns the warps' counts (lane w holds warp w's) into
    // exclusive prefixes on top of everything before.
    for (int r = warp; r < n_rep; r += warps) {
      const int c = lane < warps ? counts[lane * stride + r] : 0;
      int incl = c;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += up;
      }
      const int before = base[r];
      if (lane < warps) counts[lane * stride + r] = before + incl - c;
      __syncwarp();
      if (lane == 31) base[r] = before + incl;  // lanes >= warps add nothing: the total
    }
    __syncthreads();

    // Route the replicated entries.
#pragma unroll
    for (int u = 0; u < kMapBatches; ++u) {
      if (code[u] < 0) continue;
      const int r = code[u] >> 8;
      const int k = my_counts[r] + my_list[code[u] & 0xff];
      const int4 info = rep_info[r];
      const double x = static_cast<double>(__int_as_float(info.x));  // exact widening
      // Separate round-to-nearest multiply and add (no FMA contraction): the CPU reference
      // evaluates the same two roundings, and the decision must match it bit for bit.
      const double kd = static_cast<double>(k);
      const double lo = floor(__dadd_rn(__dmul_rn(kd, x), 0.5));
      const double hi = floor(__dadd_rn(__dmul_rn(kd + 1.0, x), 0.5));
      out[wbegin + 32 * u + lane] = T(hi > lo ? info.z : info.y);
    }
  }
  // Every writer stores the same value, so the unordered stores are benign.
  if (bad) *error_flag = 1;
}

// The kernels already allowed to use more than the default 48 KiB of dynamic shared memory, per
// device.
struct SmemLimits {
  std::mutex mutex;
  std::unordered_map<const void*, std::unordered_map<int, size_t>> allowed;  // kernel -> dev
};

SmemLimits& smem_limits() {
  static SmemLimits limits;
  return limits;
}

void allow_smem(const void* kernel, int device, size_t smem) {
  if (smem <= 48 * 1024) return;
  SmemLimits& limits = smem_limits();
  std::lock_guard<std::mutex> lock(limits.mutex);
  size_t& allowed = limits.allowed[kernel][device];
  if (allowed >= smem) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             "map_idx: cudaFuncSetAttribute");
  allowed = smem;
}

}  // namespace

void launch_map_idx(const void* idx, bool idx_int64, std::int64_t n, void* out,
                    const float* probs, std::int64_t n_probs,
                    const std::int32_t* workload_by_sm, int n_sms, int n_logical,
                    const std::int32_t* log2phy, const std::int32_t* prob_index,
                    std::int32_t* error_flag, cudaStream_t stream) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "map_idx: cudaGetDevice");
  // The largest dynamic shared memory a block of this device may use (opt-in).
  const size_t budget = static_cast<size_t>(
      common::device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, "lplb"));
  const size_t fixed = MapSmem::fixed(n_logical);
  const size_t per_warp = MapSmem::per_warp(n_logical);
  const size_t fit = budget > fixed ? (budget - fixed) / per_warp : 0;
  const int warps = fit > kMaxMapWarps ? kMaxMapWarps : static_cast<int>(fit);
  if (warps < 1) {
    throw std::invalid_argument("map_idx: n_logical=" + std::to_string(n_logical) +
                                " needs more shared memory than one block has");
  }
  const size_t smem = fixed + static_cast<size_t>(warps) * per_warp;
  const std::int64_t chunk = n == 0 ? 0 : (n + n_sms - 1) / n_sms;
  dispatch_index_type(idx_int64, [&](auto tag) {
    using T = decltype(tag);
    allow_smem(reinterpret_cast<const void*>(map_idx_kernel<T>), device, smem);
    launch("map_idx_kernel", map_idx_kernel<T>, n_sms, warps * 32, smem, stream,
           static_cast<const T*>(idx), n, chunk, static_cast<T*>(out), probs, n_probs,
           workload_by_sm, n_logical, log2phy, prob_index, error_flag);
  });
}

}  // namespace lplb
