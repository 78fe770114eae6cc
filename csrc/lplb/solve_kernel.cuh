// The solve kernel: the per-group LP of docs/lp.md by augmenting paths (a max-flow method with a
// rising lower bound), one 32-thread block per group, in double precision.
//
// Layout: lane r owns rank r of the group: its load, the share own[d] of each of its D replicated
// sets that stays on it, and a copy held[d] of the share that the owner of the set it holds a
// replica of (rank r2o[r, d]) keeps. Both copies of a share are updated with the same operands,
// so they stay bitwise equal. Sets of ranks and paths are 32-bit lane masks, uniform over the
// warp (ballots), so all lanes take the same branches; a breadth-first search advances one level
// per step with every lane looking at its 2D neighbours at once.
//
// The method (docs/lp.md, "Solver"): t starts at a lower bound of the optimum. A search from
// every rank above t follows residual capacity (share that can move across a set) to the nearest
// rank below t and moves as much load along that path as the path allows. When no rank below t
// is reachable, the reached ranks S have no share left to give away, so their mean load is a
// lower bound of the optimum larger than t: t rises to it. When no rank is above t, t is both a
// lower bound and the maximum load: optimal.
#pragma once

#include <cmath>

#include "common.cuh"
#include "kernels.cuh"

namespace lplb {
namespace {

constexpr double kTolExcess = 1e-12;    // a load above t by more than this is "over"
constexpr double kTolCapacity = 1e-13;  // a share below this cannot move any more
constexpr int kMaxSearches = 2048;
constexpr int kSmoothingRounds = 4;
constexpr double kEvenShare = 0.5;

__device__ __forceinline__ double load_workload(const void* p, WorkloadType type, int i) {
  switch (type) {
    case WorkloadType::kInt32:
      return static_cast<double>(static_cast<const std::int32_t*>(p)[i]);
    case WorkloadType::kInt64:
      return static_cast<double>(static_cast<const std::int64_t*>(p)[i]);
    case WorkloadType::kFloat32:
      return static_cast<double>(static_cast<const float*>(p)[i]);
    default:
      return static_cast<const double*>(p)[i];
  }
}

// Xor butterflies over the whole warp: bitwise equal results in every lane. The CPU reference
// (lplb/reference.py, _warp_sum) adds in the same order.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// v[d] += delta for the one d == which (registers, no local-memory indexing).
template <int D>
__device__ __forceinline__ void add_at(double (&v)[D], int which, double delta) {
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d == which) v[d] += delta;
  }
}

template <int D>
__global__ void __launch_bounds__(32, 1) solve_kernel(SolveArgs a) {
  const int G = a.group_size;
  const int lane = threadIdx.x;
  const bool act = lane < G;
  const unsigned me = 1u << lane;
  const unsigned ranks = G == 32 ? kFullMask : (1u << G) - 1u;

  int r2o[D], o2r[D];
  double W[D];
  double F = 0.0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    r2o[d] = act ? a.r2o[lane * D + d] : lane;
    o2r[d] = act ? a.o2r[lane * D + d] : lane;
    W[d] = 0.0;
  }
  wait_for_inputs();  // the workload, and the previous call's readers of probs
  allow_dependents();
  if (act) {
    const std::int32_t* slots =
        a.phy2log + (static_cast<std::int64_t>(blockIdx.x) * G + lane) * a.n_local_routed;
    // phy2log entries outside [0, n_logical) carry no load (never an out-of-bounds read).
    auto load = [&](int j) {
      const int e = slots[j];
      return e >= 0 && e < a.n_logical ? load_workload(a.workload, a.workload_type, e) : 0.0;
    };
    // Unrolled so that the loads of several slots are in flight at once.
#pragma unroll 4
    for (int c = 0; c < a.n_combined; ++c) {
#pragma unroll
      for (int d = 0; d < D; ++d) W[d] += load(c * D + d);
    }
#pragma unroll 8
    for (int j = a.n_combined * D; j < a.n_local_logical; ++j) F += load(j);
  }
  double total = F;
#pragma unroll
  for (int d = 0; d < D; ++d) total += W[d];
  const bool bad_input = __any_sync(kFullMask, act && !isfinite(total));
  const double scale = warp_max(act ? total : 0.0);

  float* out = a.probs + (static_cast<std::int64_t>(blockIdx.x) * G + lane) * D;
  auto count_success = [&]() {
    if (lane != 0) return;
    if (a.avail_int64) {
      atomicAdd(static_cast<unsigned long long*>(a.avail_counter), 1ull);
    } else {
      atomicAdd(static_cast<int*>(a.avail_counter), 1);
    }
  };
  if (bad_input || !(scale > 0.0)) {
    if (act) {
#pragma unroll
      for (int d = 0; d < D; ++d) out[d] = static_cast<float>(kEvenShare);
    }
    // An empty group is trivially balanced: solved. Non-finite input is a failure.
    if (!bad_input) count_success();
    return;
  }

  F /= scale;
  double own[D], held[D];
  double load = F;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    W[d] /= scale;
    own[d] = 0.5 * W[d];
    load += own[d];
  }
#pragma unroll
  for (int d = 0; d < D; ++d) {
    held[d] = __shfl_sync(kFullMask, own[d], r2o[d]);
    load += __shfl_sync(kFullMask, W[d], r2o[d]) - held[d];
  }
  if (!act) load = 0.0;
  // Smoothing: every set moves 1/(4D) of its two ranks' load difference to the lighter one, as
  // far as its share allows (diffusion, stable for degree 2D). Cheap and parallel, it leaves the
  // searches below fewer and shorter paths to find; exactness comes from the searches alone.
  // Idle lanes are their own neighbours with nothing to move.
  const double rate = 1.0 / (4 * D);
  for (int round = 0; round < kSmoothingRounds; ++round) {
    double moved[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const double m = (load - __shfl_sync(kFullMask, load, o2r[d])) * rate;
      moved[d] = m > 0.0 ? fmin(m, own[d]) : fmax(m, own[d] - W[d]);
      own[d] -= moved[d];
    }
#pragma unroll
    for (int d = 0; d < D; ++d) load -= moved[d];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const double in = __shfl_sync(kFullMask, moved[d], r2o[d]);
      held[d] -= in;
      load += in;
    }
  }
  // Lower bounds of the optimum: every rank keeps its fixed load; some rank carries the mean.
  double t = fmax(warp_max(act ? F : -INFINITY), warp_sum(load) / G);

  bool converged = false;
  for (int searches = 0;; ++searches) {
    const double excess = load - t;
    const unsigned over = __ballot_sync(kFullMask, act && excess > kTolExcess);
    if (over == 0) {
      converged = true;
      break;
    }
    if (searches == kMaxSearches) break;
    const unsigned under = __ballot_sync(kFullMask, act && excess < -kTolExcess);

    // Breadth-first search from all over ranks at once. A lane joins at the first level where a
    // neighbour in the frontier can pass it share: the holder of its own set d (o2r[d]) can
    // give back W[d] - own[d], the owner of the set it holds (r2o[d]) can give held[d]. Among
    // several, the first in the order (d, held before own) is its parent. `bottleneck` is the
    // least capacity on the path from the root (the root's excess included); `path` its lanes.
    unsigned visited = over | ~ranks;
    unsigned frontier = over;
    double bottleneck = excess;
    unsigned path = me;
    int parent = -1, via = -1;
    int sink = -1;
    for (;;) {
      int from = lane, edge = -1;
      double capacity = 0.0;
      if (!(visited & me)) {
#pragma unroll
        for (int k = 2 * D - 1; k >= 0; --k) {
          const int d = k >> 1;
          const int src = (k & 1) ? o2r[d] : r2o[d];
          const double cap = (k & 1) ? W[d] - own[d] : held[d];
          if (((frontier >> src) & 1u) && cap > kTolCapacity) {
            from = src;
            edge = k;
            capacity = cap;
          }
        }
      }
      const double bottleneck_from = __shfl_sync(kFullMask, bottleneck, from);
      const unsigned path_from = __shfl_sync(kFullMask, path, from);
      const unsigned fresh = __ballot_sync(kFullMask, edge >= 0);
      if (edge >= 0) {
        parent = from;
        via = edge;
        bottleneck = fmin(bottleneck_from, capacity);
        path = path_from | me;
      }
      if (fresh == 0) break;
      visited |= fresh;
      frontier = fresh;
      const unsigned hit = fresh & under;
      if (hit != 0) {
        sink = __ffs(hit) - 1;
        break;
      }
    }

    if (sink < 0) {
      // The reached ranks cannot shed load: their mean is a larger lower bound.
      const unsigned members = visited & ranks;
      const double t_new = warp_sum((members & me) ? load : 0.0) / __popc(members);
      if (!(t_new > t)) {
        converged = true;  // the excess left is below G * kTolExcess
        break;
      }
      t = t_new;
      continue;
    }

    const double delta = fmin(__shfl_sync(kFullMask, bottleneck, sink),
                              -__shfl_sync(kFullMask, excess, sink));
    const unsigned on_path = __shfl_sync(kFullMask, path, sink);
    // Every path lane but the root applies its incoming edge; its parent, the other rank of the
    // same set, finds the edge in a ballot per edge kind and updates its copy of the share.
    const bool moved_in = (on_path & me) && parent >= 0;
    if (moved_in) {
      if (via & 1) {
        add_at(own, via >> 1, delta);
      } else {
        add_at(held, via >> 1, -delta);
      }
    }
#pragma unroll
    for (int d = 0; d < D; ++d) {
      // The holder of my set d took share of it; the owner of the set I hold got share back.
      const unsigned took = __ballot_sync(kFullMask, moved_in && via == 2 * d);
      const unsigned got_back = __ballot_sync(kFullMask, moved_in && via == 2 * d + 1);
      if ((took >> o2r[d]) & 1u) own[d] -= delta;
      if ((got_back >> r2o[d]) & 1u) held[d] += delta;
    }
    if ((on_path & me) && parent < 0) load -= delta;
    if (lane == sink) load += delta;
  }

  if (act) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const double x = W[d] > 0.0 ? fmin(1.0, fmax(0.0, own[d] / W[d])) : kEvenShare;
      out[d] = static_cast<float>(converged ? x : kEvenShare);
    }
  }
  if (converged) count_success();
}

}  // namespace

template <int D>
void launch_variant(const SolveArgs& args, cudaStream_t stream) {
  launch("solve_kernel", solve_kernel<D>, args.n_group, 32, 0, stream, args);
}

}  // namespace lplb
