// solve: the per-group LP of docs/lp.md by a primal-dual interior-point method (Mehrotra
// predictor-corrector, bounds 0 <= x <= 1), one 32-thread block per group, in double precision.
//
// Layout: lane r owns rank r of the group: its row of the LP (y, s, zeta_s, residual), its D
// variables x[r, d] with their bound slacks and duals, and row r of the G x G normal matrix K.
// The scalar t and its dual live redundantly in every lane. Couplings between ranks are warp
// shuffles along r2o / o2r; sums and maxima are xor butterflies, whose results are bitwise equal
// in every lane, so all lanes take the same branches. Nothing touches global memory inside the
// iteration; the only shared memory is the Cholesky factor, read by the triangular solves.
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

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Largest step a >= 0 with v + a * dv >= 0 (infinite when dv >= 0).
__device__ __forceinline__ double max_step(double v, double dv) {
  return dv < 0.0 ? -v / dv : INFINITY;
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

// Cholesky factor K = L L^T of the padded GP x GP normal matrix. Row i of `l` holds row i of L
// left of the diagonal and column i of L right of it, so both triangular solves read one entry
// per step at l[i][k]; the diagonal is kept as its inverse.
template <int GP>
struct Factor {
  double l[GP][GP + 1];  // +1 pad: lanes storing their rows hit distinct banks
  double inv_diag[GP];
};

// Lane i holds row i of K in `row` (rows >= G are identity padding). Right-looking factorisation
// with shuffles; returns false (in every lane) on a non-positive or non-finite pivot.
template <int GP>
__device__ __forceinline__ bool cholesky(double (&row)[GP], Factor<GP>& f, int lane) {
#pragma unroll
  for (int k = 0; k < GP; ++k) {
    const double pivot = __shfl_sync(kFullMask, row[k], k);
    if (!(pivot > 0.0) || !isfinite(pivot)) return false;
    const double inv = rsqrt(pivot);
    const double lk = row[k] * inv;  // L[lane, k] for lanes below the pivot
    if (lane > k) row[k] = lk;
    if (lane == k) row[k] = pivot * inv;
#pragma unroll
    for (int j = k + 1; j < GP; ++j) {
      const double ljk = __shfl_sync(kFullMask, lk, j);
      if (lane > k) {
        row[j] = fma(-lk, ljk, row[j]);
      } else if (lane == k) {
        row[j] = ljk;  // the pivot lane keeps column k of L
      }
    }
    if (lane == 0) f.inv_diag[k] = inv;
  }
  __syncwarp();  // the previous solves have finished reading f.l
  if (lane < GP) {
#pragma unroll
    for (int j = 0; j < GP; ++j) f.l[lane][j] = row[j];
  }
  __syncwarp();
  return true;
}

// Solves K v = rhs with the factor; every lane solves the whole (small) system redundantly from
// shared memory, which avoids a shuffle on each step of the two substitution chains. Returns
// this lane's entry; `total` gets the sum of all entries.
template <int GP>
__device__ __forceinline__ double cholesky_solve(const Factor<GP>& f, double rhs, int lane,
                                                 double& total) {
  double b[GP];
#pragma unroll
  for (int j = 0; j < GP; ++j) b[j] = __shfl_sync(kFullMask, rhs, j);
#pragma unroll
  for (int k = 0; k < GP; ++k) {
    b[k] *= f.inv_diag[k];
#pragma unroll
    for (int i = k + 1; i < GP; ++i) b[i] = fma(-f.l[i][k], b[k], b[i]);
  }
#pragma unroll
  for (int k = GP - 1; k >= 0; --k) {
    b[k] *= f.inv_diag[k];
#pragma unroll
    for (int i = 0; i < k; ++i) b[i] = fma(-f.l[i][k], b[k], b[i]);
  }
  double mine = 0.0;
  total = 0.0;
#pragma unroll
  for (int j = 0; j < GP; ++j) {
    total += b[j];
    if (j == lane) mine = b[j];
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
  __shared__ Factor<GP> factor;
  const int G = a.group_size;
  const int lane = threadIdx.x;
  const bool act = lane < G;

  int r2o[D], o2r[D];
  double W[D];
  double F = 0.0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    r2o[d] = act ? a.r2o[lane * D + d] : lane;
    o2r[d] = act ? a.o2r[lane * D + d] : lane;
    W[d] = 0.0;
  }
  if (act) {
    const std::int64_t base =
        (static_cast<std::int64_t>(blockIdx.x) * G + lane) * a.n_local_routed;
    // phy2log entries outside [0, n_logical) carry no load (never an out-of-bounds read).
    auto load = [&](int j) {
      const int e = a.phy2log[base + j];
      return e >= 0 && e < a.n_logical ? load_workload(a.workload, a.workload_type, e) : 0.0;
    };
    for (int c = 0; c < a.n_combined; ++c) {
#pragma unroll
      for (int d = 0; d < D; ++d) W[d] += load(c * D + d);
    }
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
  const double n_compl = static_cast<double>(2 * n + 1 + G);  // complementarity pairs
  double x[D], w[D], zx[D], nu[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    x[d] = 0.5;
    w[d] = 0.5;
    zx[d] = 1.0;
    nu[d] = 1.0;
  }
  const double load0 = c - apply_b(W, x, r2o);  // rank loads L(x) = c - B x at x = 1/2
  double t = warp_max(act ? load0 : -INFINITY) + 1.0;
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

    double ix[D], iw[D], thx[D], ka[D], kb[D];
    double res = fmax(fabs(rp), fabs(rds));
    double comp = s * zs;
    double diag_sum = 0.0;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      res = fmax(res, fmax(fabs(ru[d]), fabs(rdx[d])));
      comp += x[d] * zx[d] + w[d] * nu[d];
      ix[d] = 1.0 / x[d];
      iw[d] = 1.0 / w[d];
      thx[d] = 1.0 / (zx[d] * ix[d] + nu[d] * iw[d]);
      ka[d] = thx[d] * W[d] * W[d];  // weight of column (r, d) of B
      kb[d] = __shfl_sync(kFullMask, ka[d], r2o[d]);  // weight of column (r2o[r, d], d)
      diag_sum += ka[d] + kb[d];
    }
    const double ths = s / zs;
    const double tht = t / zt;
    const double is = 1.0 / s;
    const double itt = 1.0 / t;
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
    for (int o = 16; o > 0; o >>= 1) {
      res = fmax(res, __shfl_xor_sync(kFullMask, res, o));
      kdiag = fmax(kdiag, __shfl_xor_sync(kFullMask, kdiag, o));
      ysum += __shfl_xor_sync(kFullMask, ysum, o);
      comp += __shfl_xor_sync(kFullMask, comp, o);
    }
    if (nonfinite) break;
    const double rdt = 1.0 - ysum - zt;
    comp += t * zt;
    res = fmax(res, fabs(rdt));
    const double mu = comp / n_compl;
    if (res <= kTol && comp / (1.0 + fabs(t)) <= kTol) {
      converged = true;
      break;
    }
    if (iter == kMaxIters) break;

    // Row `lane` of K = B diag(theta_x) B^T + theta_t 1 1^T + diag(theta_s) + reg I.
    double row[GP];
    const double reg = kRegularisation * kdiag;
#pragma unroll
    for (int k = 0; k < GP; ++k) {
      double v = act && k < G ? tht : 0.0;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (o2r[d] == k) v -= ka[d];
        if (r2o[d] == k) v -= kb[d];
      }
      if (k == lane) v += act ? ths + diag_sum + reg : 1.0;
      row[k] = v;
    }
    if (!cholesky(row, factor, lane)) break;

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
      dd.y = cholesky_solve(factor, rhs, lane, sum_dy);
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
    // Largest primal / dual steps of this lane's entries (t and zeta_t are added by the caller).
    auto lane_steps = [&](const Direction<D>& dd, double& p, double& q) {
      p = INFINITY;
      q = INFINITY;
      if (!act) return;
      p = max_step(s, dd.s);
      q = max_step(zs, dd.zs);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        p = fmin(p, fmin(max_step(x[d], dd.x[d]), max_step(w[d], dd.w[d])));
        q = fmin(q, fmin(max_step(zx[d], dd.zx[d]), max_step(nu[d], dd.nu[d])));
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
    lane_steps(aff, p_aff, d_aff);
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
    for (int o = 16; o > 0; o >>= 1) {
      p_aff = fmin(p_aff, __shfl_xor_sync(kFullMask, p_aff, o));
      d_aff = fmin(d_aff, __shfl_xor_sync(kFullMask, d_aff, o));
      s_zdz += __shfl_xor_sync(kFullMask, s_zdz, o);
      s_dzz += __shfl_xor_sync(kFullMask, s_dzz, o);
      s_dzdz += __shfl_xor_sync(kFullMask, s_dzdz, o);
    }
    const double ap_aff = fmin(1.0, fmin(p_aff, max_step(t, aff.t)));
    const double ad_aff = fmin(1.0, fmin(d_aff, max_step(zt, aff.zt)));
    s_zdz += t * aff.zt;
    s_dzz += aff.t * zt;
    s_dzdz += aff.t * aff.zt;
    const double mu_aff =
        fmax(0.0, comp + ad_aff * s_zdz + ap_aff * s_dzz + ap_aff * ad_aff * s_dzdz) / n_compl;
    const double ratio = mu_aff / mu;
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
    lane_steps(dir, p_max, d_max);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      p_max = fmin(p_max, __shfl_xor_sync(kFullMask, p_max, o));
      d_max = fmin(d_max, __shfl_xor_sync(kFullMask, d_max, o));
    }
    const double ap = fmin(1.0, kStepFraction * fmin(p_max, max_step(t, dir.t)));
    const double ad = fmin(1.0, kStepFraction * fmin(d_max, max_step(zt, dir.zt)));
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

  if (act) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      out[d] = static_cast<float>(converged ? fmin(1.0, fmax(0.0, x[d])) : kFailedShare);
    }
  }
  if (converged) count_success();
}

template <int GP>
void launch_padded(const SolveArgs& args, cudaStream_t stream) {
  switch (args.n_sets) {
    case 1:
      solve_kernel<GP, 1><<<args.n_group, 32, 0, stream>>>(args);
      break;
    case 2:
      solve_kernel<GP, 2><<<args.n_group, 32, 0, stream>>>(args);
      break;
    case 3:
      solve_kernel<GP, 3><<<args.n_group, 32, 0, stream>>>(args);
      break;
    case 4:
      solve_kernel<GP, 4><<<args.n_group, 32, 0, stream>>>(args);
      break;
    default:
      throw std::invalid_argument("solve: n_sets=" + std::to_string(args.n_sets) +
                                  " is outside [1, 4]");
  }
}

}  // namespace

void launch_solve(const SolveArgs& args, cudaStream_t stream) {
  if (args.group_size < 2 || args.group_size > 32) {
    throw std::invalid_argument("solve: group_size=" + std::to_string(args.group_size) +
                                " is outside [2, 32]");
  }
  if (args.n_group <= 0) return;
  // The normal matrix is padded to the next of 4, 8, 16, 32 so the unrolled loops are static.
  if (args.group_size <= 4) {
    launch_padded<4>(args, stream);
  } else if (args.group_size <= 8) {
    launch_padded<8>(args, stream);
  } else if (args.group_size <= 16) {
    launch_padded<16>(args, stream);
  } else {
    launch_padded<32>(args, stream);
  }
  check_launch("solve_kernel");
}

}  // namespace lplb
