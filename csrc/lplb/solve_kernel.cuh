// The solve kernel: the per-group LP of docs/lp.md by a primal-dual interior-point method (Mehrotra
// predictor-corrector, bounds 0 <= x <= 1), one 32-thread block per group, in double precision.
//
// Layout: lane r owns rank r of the group: its row of the LP (y, s, zeta_s, residual), its D
// variables x[r, d] with their bound slacks and duals, and row r of the G x G normal matrix K.
// The scalar t and its dual live redundantly in every lane. Couplings between ranks are warp
// shuffles along r2o / o2r; sums and maxima are xor butterflies, whose results are bitwise equal
// in every lane, so all lanes take the same branches.
//
// One warp runs the whole solve, so its time is its instruction count times the latency it
// cannot hide. Hence: lanes beyond the group replicate its ranks, so reductions take log2 of
// the padded group size in butterfly steps; reciprocals use the hardware approximation plus
// Newton steps instead of IEEE division; step lengths are maxima of products with those
// reciprocals; K is assembled in shared memory, factored by a shuffle-based Cholesky, and both
// Newton solves of an iteration run redundantly in every lane from the shared factor.
#pragma once

#include <cmath>

#include "common.cuh"
#include "kernels.cuh"

namespace lplb {
namespace {

constexpr double kTol = 1e-9;
constexpr int kMaxIters = 64;
constexpr double kStepFraction = 0.99;
constexpr double kRegularisation = 1e-14;
constexpr double kFailedShare = 0.5;

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

// 1 / v for positive normal v to about one ulp: hardware approximation refined by two Newton
// steps, without the special-case branches of IEEE division. A zero or non-finite v gives a
// non-finite result, which the iteration treats as failure.
__device__ __forceinline__ double fast_rcp(double v) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(v));
  double e = fma(-v, r, 1.0);
  r = fma(r, e, r);
  e = fma(-v, r, 1.0);
  return fma(r, e, r);
}

// Maximum over the GP lanes of a replica set (see solve_kernel), equal in every lane.
template <int GP>
__device__ __forceinline__ double group_max(double v) {
#pragma unroll
  for (int o = GP / 2; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Step length towards the boundary: with q = max over entries of -dv / v (0 when no entry
// decreases), the largest feasible step is 1 / q; returns min(1, fraction / q).
__device__ __forceinline__ double step_length(double q, double fraction) {
  return q * 1.0 > fraction ? fraction * fast_rcp(q) : 1.0;
}

// (B v)[r] = -sum_d W[r, d] v[r, d] + sum_d W[r2o[r, d], d] v[r2o[r, d], d].
template <int D>
__device__ __forceinline__ double apply_b(const double (&w)[D], const double (&v)[D],
                                          const int (&r2o)[D]) {
  double acc = 0.0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const double wv = w[d] * v[d];
    acc += __shfl_sync(kFullMask, wv, r2o[d]) - wv;
  }
  return acc;
}

// (B^T y)[r, d] = W[r, d] (y[o2r[r, d]] - y[r]).
template <int D>
__device__ __forceinline__ void apply_bt(const double (&w)[D], double y, const int (&o2r)[D],
                                         double (&out)[D]) {
#pragma unroll
  for (int d = 0; d < D; ++d) out[d] = w[d] * (__shfl_sync(kFullMask, y, o2r[d]) - y);
}

// Shared memory of one group: the normal matrix while it is assembled, then its Cholesky factor
// (row i as kept by lane i in `cholesky`), and the vector of the current solve.
template <int GP>
struct __align__(16) Workspace {
  double k[GP][GP];
  double inv_diag[GP];
  double vec[GP];
};

// Copies the 16-byte pairs of a shared row that hold entries [lo, GP) into registers (`lo` is
// a constant after unrolling); rows and vectors are broadcast: every lane reads one address.
template <int GP>
__device__ __forceinline__ void load_row(const double* src, double (&dst)[GP], int lo = 0) {
#pragma unroll
  for (int j = 0; j < GP; j += 2) {
    if (j + 1 < lo) continue;
    const double2 v = reinterpret_cast<const double2*>(src)[j / 2];
    dst[j] = v.x;
    dst[j + 1] = v.y;
  }
}

template <int GP>
__device__ __forceinline__ void store_row(double* dst, const double (&src)[GP]) {
#pragma unroll
  for (int j = 0; j < GP; j += 2) {
    reinterpret_cast<double2*>(dst)[j / 2] = make_double2(src[j], src[j + 1]);
  }
}

// Cholesky factor K = L L^T of the padded GP x GP matrix; lane i < GP holds row i of K in `row`,
// the other lanes a copy of row `rank`. Right-looking, with shuffles (for GP <= 8: redundantly
// in every lane, from shared memory). Afterwards row i of
// ws.k holds row i of L left of the diagonal and column i of L right of it, so the forward
// substitution reads row k right of the diagonal and the backward one row k left of it, both
// contiguous. Returns false (in every lane) on a non-positive or non-finite pivot.
template <int GP>
__device__ __forceinline__ bool cholesky(double (&row)[GP], Workspace<GP>& ws, int lane,
                                         int rank) {
  if constexpr (GP <= 8) {
    // Small matrices: every lane factors the whole matrix in registers, which takes the
    // shuffles off the pivot chain; lane 0 publishes the factor in the same layout.
    double a[GP][GP];
#pragma unroll
    for (int i = 0; i < GP; ++i) load_row(ws.k[i], a[i]);
    double inv_diag[GP];
#pragma unroll
    for (int k = 0; k < GP; ++k) {
      const double pivot = a[k][k];
      if (!(pivot > 0.0) || !isfinite(pivot)) return false;
      inv_diag[k] = rsqrt(pivot);
#pragma unroll
      for (int i = k + 1; i < GP; ++i) a[i][k] *= inv_diag[k];
#pragma unroll
      for (int i = k + 1; i < GP; ++i) {
#pragma unroll
        for (int j = k + 1; j <= i; ++j) a[i][j] = fma(-a[i][k], a[j][k], a[i][j]);
      }
    }
    __syncwarp();  // every lane has read K (and the last solve the previous factor)
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < GP; ++i) {
        double out[GP];
#pragma unroll
        for (int j = 0; j < GP; ++j) out[j] = j < i ? a[i][j] : (j > i ? a[j][i] : 0.0);
        store_row(ws.k[i], out);
      }
      store_row(ws.inv_diag, inv_diag);
    }
    __syncwarp();
    return true;
  }
#pragma unroll
  for (int k = 0; k < GP; ++k) {
    const double pivot = __shfl_sync(kFullMask, row[k], k);
    if (!(pivot > 0.0) || !isfinite(pivot)) return false;
    const double inv = rsqrt(pivot);
    const double lk = row[k] * inv;  // L[rank, k] for ranks below the pivot
    if (rank > k) row[k] = lk;
    if (rank == k) row[k] = pivot * inv;
#pragma unroll
    for (int j = k + 1; j < GP; ++j) {
      const double ljk = __shfl_sync(kFullMask, lk, j);
      if (rank > k) {
        row[j] = fma(-lk, ljk, row[j]);
      } else if (rank == k) {
        row[j] = ljk;  // the pivot row keeps column k of L
      }
    }
    if (lane == 0) ws.inv_diag[k] = inv;
  }
  __syncwarp();  // every lane has read its row of K (and the last solve its factor)
  if (lane < GP) store_row(ws.k[lane], row);
  __syncwarp();
  return true;
}

// Solves K v = rhs (rhs: this lane's entry) with the factor in shared memory. Every lane runs
// both substitutions redundantly on the whole (small) vector: no communication per step.
// Returns this lane's entry of v; `total` gets sum(v), consistent with the entries.
template <int GP>
__device__ __forceinline__ double cholesky_solve(Workspace<GP>& ws, double rhs, int lane,
                                                 int rank, double& total) {
  if (lane < GP) ws.vec[lane] = rhs;
  __syncwarp();
  double b[GP], inv_diag[GP];
  load_row(ws.vec, b);
  load_row(ws.inv_diag, inv_diag);
  __syncwarp();  // every lane has read ws.vec before the next solve overwrites it
#pragma unroll
  for (int k = 0; k < GP; ++k) {
    double lrow[GP];
    load_row(ws.k[k], lrow, k + 1);  // entries i > k: L[i][k]
    b[k] *= inv_diag[k];
#pragma unroll
    for (int i = k + 1; i < GP; ++i) b[i] = fma(-lrow[i], b[k], b[i]);
  }
#pragma unroll
  for (int k = GP - 1; k >= 0; --k) {
    double lrow[GP];
    load_row(ws.k[k], lrow);  // entries i < k: L[k][i]
    b[k] *= inv_diag[k];
#pragma unroll
    for (int i = 0; i < k; ++i) b[i] = fma(-lrow[i], b[k], b[i]);
  }
  double mine = 0.0;
  total = 0.0;
#pragma unroll
  for (int j = 0; j < GP; ++j) {
    total += b[j];
    if (j == rank) mine = b[j];
  }
  return mine;
}

// One Newton direction of a lane: primal (x, w, t, s) and dual (y, zeta_x, nu, zeta_t, zeta_s).
template <int D>
struct Direction {
  double x[D], w[D], zx[D], nu[D];
  double t, s, y, zt, zs;
};

template <int GP, int D>
__global__ void __launch_bounds__(32) solve_kernel(SolveArgs a) {
  __shared__ Workspace<GP> ws;
  const int G = a.group_size;
  const int lane = threadIdx.x;
  // Lanes GP..31 replicate lanes 0..GP-1 (rank = lane % GP): every reduction then needs only
  // log2(GP) butterfly steps and still leaves the same value in all 32 lanes.
  const int rank = lane % GP;
  const bool act = rank < G;
  const bool owner = lane < G;  // writes the outputs of its rank

  int r2o[D], o2r[D];
  double W[D];
  double F = 0.0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    r2o[d] = act ? a.r2o[rank * D + d] : rank;
    o2r[d] = act ? a.o2r[rank * D + d] : rank;
    W[d] = 0.0;
  }
  if (act) {
    const std::int32_t* slots =
        a.phy2log + (static_cast<std::int64_t>(blockIdx.x) * G + rank) * a.n_local_routed;
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
  const double scale = group_max<GP>(act ? total : 0.0);

  float* out = a.probs + (static_cast<std::int64_t>(blockIdx.x) * G + rank) * D;
  auto count_success = [&]() {
    if (lane != 0) return;
    if (a.avail_int64) {
      atomicAdd(static_cast<unsigned long long*>(a.avail_counter), 1ull);
    } else {
      atomicAdd(static_cast<int*>(a.avail_counter), 1);
    }
  };
  if (bad_input || !(scale > 0.0)) {
    if (owner) {
#pragma unroll
      for (int d = 0; d < D; ++d) out[d] = static_cast<float>(kFailedShare);
    }
    // An empty group is trivially balanced: solved. Non-finite input is a failure.
    if (!bad_input) count_success();
    return;
  }

  F /= scale;
#pragma unroll
  for (int d = 0; d < D; ++d) W[d] /= scale;
  double c = F;  // right-hand side of row r
#pragma unroll
  for (int d = 0; d < D; ++d) c += __shfl_sync(kFullMask, W[d], r2o[d]);

  const int n = G * D;
  const double inv_n_compl = 1.0 / static_cast<double>(2 * n + 1 + G);  // complementarity pairs
  double x[D], w[D], zx[D], nu[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    x[d] = 0.5;
    w[d] = 0.5;
    zx[d] = 1.0;
    nu[d] = 1.0;
  }
  const double load0 = c - apply_b(W, x, r2o);  // rank loads L(x) = c - B x at x = 1/2
  double t = group_max<GP>(act ? load0 : -INFINITY) + 1.0;
  // Idle lanes keep harmless positive values; they are masked out of every reduction.
  double s = act ? t - load0 : 1.0;
  double y = act ? 1.0 / G : 0.0;
  double zt = 1.0 / G;
  double zs = act ? 1.0 / G : 1.0;

  bool converged = false;
  // kMaxIters steps, each preceded by the convergence test, plus a final test after the last.
  for (int iter = 0;; ++iter) {
    const double rp = c - (t - s + apply_b(W, x, r2o));
    double ru[D], rdx[D];
    apply_bt(W, y, o2r, rdx);
#pragma unroll
    for (int d = 0; d < D; ++d) {
      ru[d] = 1.0 - x[d] - w[d];
      rdx[d] = -rdx[d] - zx[d] + nu[d];
    }
    const double rds = y - zs;

    // Reciprocals of every primal and dual entry, shared by both directions and step lengths.
    double ix[D], iw[D], izx[D], inu[D], thx[D], ka[D], kb[D];
    double res = fmax(fabs(rp), fabs(rds));
    double comp = s * zs;
    double diag_sum = 0.0;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      res = fmax(res, fmax(fabs(ru[d]), fabs(rdx[d])));
      comp += x[d] * zx[d] + w[d] * nu[d];
      ix[d] = fast_rcp(x[d]);
      iw[d] = fast_rcp(w[d]);
      izx[d] = fast_rcp(zx[d]);
      inu[d] = fast_rcp(nu[d]);
      thx[d] = fast_rcp(zx[d] * ix[d] + nu[d] * iw[d]);
      ka[d] = thx[d] * W[d] * W[d];  // weight of column (r, d) of B
      kb[d] = __shfl_sync(kFullMask, ka[d], r2o[d]);  // weight of column (r2o[r, d], d)
      diag_sum += ka[d] + kb[d];
    }
    const double is = fast_rcp(s);
    const double itt = fast_rcp(t);
    const double izs = fast_rcp(zs);
    const double izt = fast_rcp(zt);
    const double ths = s * izs;
    const double tht = t * izt;
    double kdiag = tht + ths + diag_sum;
    double ysum = y;
    if (!act) {
      res = 0.0;
      comp = 0.0;
      kdiag = 0.0;
      ysum = 0.0;
    }
    const bool nonfinite =
        __any_sync(kFullMask, !(isfinite(res) && isfinite(comp) && isfinite(kdiag)));
#pragma unroll
    for (int o = GP / 2; o > 0; o >>= 1) {
      res = fmax(res, __shfl_xor_sync(kFullMask, res, o));
      kdiag = fmax(kdiag, __shfl_xor_sync(kFullMask, kdiag, o));
      ysum += __shfl_xor_sync(kFullMask, ysum, o);
      comp += __shfl_xor_sync(kFullMask, comp, o);
    }
    if (nonfinite) break;
    const double rdt = 1.0 - ysum - zt;
    comp += t * zt;
    res = fmax(res, fabs(rdt));
    const double mu = comp * inv_n_compl;
    if (res <= kTol && comp <= kTol * (1.0 + fabs(t))) {
      converged = true;
      break;
    }
    if (iter == kMaxIters) break;

    // Row `lane` of K = B diag(theta_x) B^T + theta_t 1 1^T + diag(theta_s) + reg I, assembled
    // in shared memory (the off-diagonal columns come from r2o / o2r at run time), then
    // factored in registers. Padding rows G..GP-1 are identity.
    double row[GP];
#pragma unroll
    for (int j = 0; j < GP; ++j) row[j] = act && j < G ? tht : (j == rank ? 1.0 : 0.0);
    if (lane < GP) {
      store_row(ws.k[lane], row);
      if (act) {
        ws.k[lane][lane] += ths + diag_sum + kRegularisation * kdiag;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          ws.k[lane][o2r[d]] -= ka[d];
          ws.k[lane][r2o[d]] -= kb[d];
        }
      }
    }
    __syncwarp();
    load_row(ws.k[rank], row);
    if (!cholesky(row, ws, lane, rank)) break;

    auto direction = [&](const double(&rzx)[D], double rzt, double rzs, const double(&rwn)[D],
                         Direction<D>& dd) {
      double hx[D], vx[D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        hx[d] = rdx[d] - rzx[d] * ix[d] + (rwn[d] - nu[d] * ru[d]) * iw[d];
        vx[d] = thx[d] * hx[d];
      }
      const double ht = rdt - rzt * itt;
      const double hs = rds - rzs * is;
      double rhs = rp + apply_b(W, vx, r2o) + tht * ht - ths * hs;
      if (!act) rhs = 0.0;  // padding rows of K are identity: their entries of dy stay 0
      double sum_dy;
      dd.y = cholesky_solve(ws, rhs, lane, rank, sum_dy);
      double mty[D];
      apply_bt(W, dd.y, o2r, mty);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        dd.x[d] = thx[d] * (mty[d] - hx[d]);
        dd.w[d] = ru[d] - dd.x[d];
        dd.zx[d] = (rzx[d] - zx[d] * dd.x[d]) * ix[d];
        dd.nu[d] = (rwn[d] - nu[d] * dd.w[d]) * iw[d];
      }
      dd.t = tht * (sum_dy - ht);
      dd.zt = (rzt - zt * dd.t) * itt;
      // Slack entries from the linear rows, not from theta * (M^T dy - h): near the optimum the
      // latter carries an absolute error of about eps * max(theta) and stalls |r_p| (lp.md).
      dd.s = apply_b(W, dd.x, r2o) + dd.t - rp;
      dd.zs = rds + dd.y;
    };
    // Largest relative decrease -dv / v of this lane's primal (p) and dual (q) entries; t and
    // zeta_t, the same in every lane, are added after the reduction.
    auto lane_decrease = [&](const Direction<D>& dd, double& p, double& q) {
      p = 0.0;
      q = 0.0;
      if (!act) return;
      p = fmax(-dd.s * is, 0.0);
      q = -dd.zs * izs;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        p = fmax(p, fmax(-dd.x[d] * ix[d], -dd.w[d] * iw[d]));
        q = fmax(q, fmax(-dd.zx[d] * izx[d], -dd.nu[d] * inu[d]));
      }
    };

    // Predictor (affine-scaling) direction.
    double rzx[D], rwn[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      rzx[d] = -x[d] * zx[d];
      rwn[d] = -w[d] * nu[d];
    }
    Direction<D> aff;
    direction(rzx, -t * zt, -s * zs, rwn, aff);
    double p_aff, d_aff;
    lane_decrease(aff, p_aff, d_aff);
    // mu_aff expands (z + a_p dz)(zeta + a_d dzeta) so one butterfly serves steps and sums.
    double s_zdz = s * aff.zs, s_dzz = aff.s * zs, s_dzdz = aff.s * aff.zs;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      s_zdz += x[d] * aff.zx[d] + w[d] * aff.nu[d];
      s_dzz += aff.x[d] * zx[d] + aff.w[d] * nu[d];
      s_dzdz += aff.x[d] * aff.zx[d] + aff.w[d] * aff.nu[d];
    }
    if (!act) s_zdz = s_dzz = s_dzdz = 0.0;
#pragma unroll
    for (int o = GP / 2; o > 0; o >>= 1) {
      p_aff = fmax(p_aff, __shfl_xor_sync(kFullMask, p_aff, o));
      d_aff = fmax(d_aff, __shfl_xor_sync(kFullMask, d_aff, o));
      s_zdz += __shfl_xor_sync(kFullMask, s_zdz, o);
      s_dzz += __shfl_xor_sync(kFullMask, s_dzz, o);
      s_dzdz += __shfl_xor_sync(kFullMask, s_dzdz, o);
    }
    const double ap_aff = step_length(fmax(p_aff, -aff.t * itt), 1.0);
    const double ad_aff = step_length(fmax(d_aff, -aff.zt * izt), 1.0);
    s_zdz += t * aff.zt;
    s_dzz += aff.t * zt;
    s_dzdz += aff.t * aff.zt;
    const double mu_aff =
        fmax(0.0, comp + ad_aff * s_zdz + ap_aff * s_dzz + ap_aff * ad_aff * s_dzdz) *
        inv_n_compl;
    const double ratio = mu_aff * fast_rcp(mu);
    const double sigma_mu = ratio * ratio * ratio * mu;

    // Corrector direction.
#pragma unroll
    for (int d = 0; d < D; ++d) {
      rzx[d] = sigma_mu - x[d] * zx[d] - aff.x[d] * aff.zx[d];
      rwn[d] = sigma_mu - w[d] * nu[d] - aff.w[d] * aff.nu[d];
    }
    Direction<D> dir;
    direction(rzx, sigma_mu - t * zt - aff.t * aff.zt, sigma_mu - s * zs - aff.s * aff.zs, rwn,
              dir);
    double p_max, d_max;
    lane_decrease(dir, p_max, d_max);
#pragma unroll
    for (int o = GP / 2; o > 0; o >>= 1) {
      p_max = fmax(p_max, __shfl_xor_sync(kFullMask, p_max, o));
      d_max = fmax(d_max, __shfl_xor_sync(kFullMask, d_max, o));
    }
    const double ap = step_length(fmax(p_max, -dir.t * itt), kStepFraction);
    const double ad = step_length(fmax(d_max, -dir.zt * izt), kStepFraction);
    t += ap * dir.t;
    zt += ad * dir.zt;
    if (act) {
      s += ap * dir.s;
      y += ad * dir.y;
      zs += ad * dir.zs;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        x[d] += ap * dir.x[d];
        w[d] += ap * dir.w[d];
        zx[d] += ad * dir.zx[d];
        nu[d] += ad * dir.nu[d];
      }
    }
  }

  if (owner) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      out[d] = static_cast<float>(converged ? fmin(1.0, fmax(0.0, x[d])) : kFailedShare);
    }
  }
  if (converged) count_success();
}

}  // namespace

// Launches the kernel for groups padded to GP lanes with D redundant sets per rank. Explicit
// instantiations live in the solve_*.cu files, split so that the heavily unrolled variants
// compile in parallel; solve.cu picks one at run time.
template <int GP, int D>
void launch_variant(const SolveArgs& args, cudaStream_t stream) {
  solve_kernel<GP, D><<<args.n_group, 32, 0, stream>>>(args);
}

}  // namespace lplb
