"""CPU reference backend of LPLB: token counting, the batched LP solve, and token mapping.

Implements exactly the contract of docs/lp.md in torch float64, so that it is the oracle the
CUDA kernels are held to. All groups of a call are solved together: every tensor carries a
leading batch dimension `B` (one LP per EP group) and the groups iterate in lockstep, a
converged or failed group being frozen while the others continue.
"""

from dataclasses import dataclass

import torch

__all__ = ["IpmResult", "count_idx", "group_loads", "ipm_solve", "map_idx", "solve"]

TOL = 1e-9
MAX_ITER = 64
# Fraction of the distance to the boundary taken by a step, keeping iterates interior.
STEP_FRACTION = 0.99
# Relative diagonal shift of the normal matrix: keeps Cholesky going when rows become
# nearly dependent close to the optimum (several ranks at the maximum load).
NORMAL_REG = 1e-14


def _chunk_of_entries(n: int, n_sms: int) -> torch.Tensor:
    """Chunk of each of n flattened entries: [n] int64, chunks of ceil(n / n_sms) entries."""
    chunk = max(1, -(-n // n_sms))
    return torch.arange(n, dtype=torch.int64) // chunk


def _checked_flat(idx: torch.Tensor, n_logical: int) -> torch.Tensor:
    """Flattened int64 ``idx``; ValueError naming the first entry outside [-1, n_logical)."""
    flat = idx.reshape(-1).to(torch.int64)
    bad = (flat < -1) | (flat >= n_logical)
    if bool(bad.any()):
        raise ValueError(
            f"idx contains {flat[bad][0].item()}, outside [-1, {n_logical}) "
            f"(n_logical_routed_experts = {n_logical})"
        )
    return flat


def count_idx(idx: torch.Tensor, n_logical: int, n_sms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count tokens per logical expert, overall and as inclusive running totals over SM chunks.

    The flattened `idx` (N entries) is cut into `n_sms` chunks of `ceil(N / n_sms)` consecutive
    entries; `-1` entries are not counted.

    Args:
        idx: any shape, int32 or int64, values in [-1, n_logical).
        n_logical: number of logical experts E.
        n_sms: number of chunks (>= 1).

    Returns:
        workload: [E] int32, tokens per expert.
        workload_by_sm: [n_sms, E] int32, row s = tokens per expert in chunks 0..s (the last
        row equals workload, as in DeepSeek LPLB).

    Raises:
        ValueError: if an index lies outside [-1, n_logical).
    """
    flat = _checked_flat(idx, n_logical)
    sm = _chunk_of_entries(flat.numel(), n_sms)
    valid = flat >= 0
    counts = torch.bincount(sm[valid] * n_logical + flat[valid], minlength=n_sms * n_logical).view(
        n_sms, n_logical
    )
    return counts.sum(0).to(torch.int32), counts.cumsum(0).to(torch.int32)


def group_loads(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    group_size: int,
    n_sets: int,
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group LP inputs: replicated-set loads W and fixed loads F (docs/lp.md).

    Args:
        workload: [E] tokens per logical expert, any int/float dtype.
        phy2log: [R] logical expert of each physical slot, R = B * group_size * n_local_routed.
        group_size, n_sets: G and D of the topology.
        n_local_logical, n_local_routed, n_combined: original slots, all slots and experts per
            replicated set (C) of one rank.

    Returns:
        W: [B, G, D] float64, `W[b, r, d] = sum_c workload[slot c * D + d of rank r]`.
        F: [B, G] float64, tokens of the non-replicated original slots of each rank.
    """
    wl = workload.to(torch.float64)
    slots = phy2log.to(torch.int64).view(-1, group_size, n_local_routed)[..., :n_local_logical]
    load = wl[slots]
    n_rep = n_combined * n_sets
    w = load[..., :n_rep].unflatten(-1, (n_combined, n_sets)).sum(-2)
    f = load[..., n_rep:].sum(-1)
    return w, f


@dataclass
class IpmResult:
    """Outcome of `ipm_solve` for B groups.

    Attributes:
        x: [B, G, D] float64 shares kept on the original rank; clamped to [0, 1] for solved
            groups, 0.5 for failed ones.
        converged: [B] bool, the group met the tolerance (or had no tokens).
        iterations: [B] int64, IPM steps taken (the cap for groups that did not converge).
    """

    x: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest alpha >= 0 with v + alpha * dv >= 0, per batch row ([B, K] -> [B], may be inf)."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, torch.inf))
    return ratio.amin(-1)


def _step_lengths(
    point: tuple[torch.Tensor, ...], step: tuple[torch.Tensor, ...], fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and dual step lengths: min(1, fraction * largest step keeping the side >= 0).

    Args:
        point: (z, w, zeta, nu), step: (dz, dw, dzeta, dnu), each [B, K] float64.

    Returns:
        a_p, a_d: [B] float64.
    """
    z, w, zeta, nu = point
    dz, dw, dzeta, dnu = step
    primal = _max_step(torch.cat([z, w], 1), torch.cat([dz, dw], 1))
    dual = _max_step(torch.cat([zeta, nu], 1), torch.cat([dzeta, dnu], 1))
    return (fraction * primal).clamp(max=1.0), (fraction * dual).clamp(max=1.0)


def _lp_matrices(
    w: torch.Tensor, f: torch.Tensor, r2o: torch.Tensor, o2r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-form data of the scaled LPs.

    Args:
        w: [B, G, D] float64, f: [B, G] float64 (already scaled), r2o/o2r: [G, D] int64.

    Returns:
        M: [B, G, N] float64, `[B | 1 | -I]` with N = G * D + 1 + G.
        c: [B, G] float64 right-hand side.
    """
    b, g, d = w.shape
    n = g * d
    wf = w.reshape(b, n)
    cols = torch.arange(n)
    bmat = torch.zeros(b, g, n, dtype=torch.float64)
    bmat[:, torch.arange(g).repeat_interleave(d), cols] = -wf
    bmat[:, o2r.reshape(-1), cols] = wf
    c = f + w[:, r2o, torch.arange(d)].sum(-1)
    eye = torch.eye(g, dtype=torch.float64).expand(b, g, g)
    m = torch.cat([bmat, torch.ones(b, g, 1, dtype=torch.float64), -eye], dim=2)
    return m, c


def ipm_solve(
    w: torch.Tensor,
    f: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> IpmResult:
    """Solve B min-max-load LPs with Mehrotra's predictor-corrector method (docs/lp.md).

    Args:
        w: [B, G, D] replicated-set loads, f: [B, G] fixed loads (any float dtype, unscaled).
        r2o: [G, D] topology, o2r: [G, D] its column-wise inverse (integer tensors).
        max_iter: iteration cap (tests lower it to force failures).
        tol: tolerance on residuals and relative gap, in scaled units.
    """
    w = w.to(torch.float64)
    f = f.to(torch.float64)
    r2o = r2o.to(torch.int64)
    o2r = o2r.to(torch.int64)
    b, g, d = w.shape
    n = g * d
    big_n = n + 1 + g

    scale = (f + w.sum(-1)).amax(-1)
    empty = scale == 0
    safe = torch.where(empty, torch.ones_like(scale), scale)
    m, c = _lp_matrices(w / safe[:, None, None], f / safe[:, None], r2o, o2r)
    mt = m.transpose(1, 2)
    cost = torch.zeros(big_n, dtype=torch.float64)
    cost[n] = 1.0

    # Starting point of docs/lp.md: x = w = 1/2, t one above the largest load, s its slack.
    x0 = torch.full((b, n), 0.5, dtype=torch.float64)
    load0 = c - (m[..., :n] @ x0[..., None]).squeeze(-1)
    t0 = load0.amax(-1, keepdim=True) + 1.0
    z = torch.cat([x0, t0, t0 - load0], dim=1)
    wu = torch.full((b, n), 0.5, dtype=torch.float64)
    y = torch.full((b, g), 1.0 / g, dtype=torch.float64)
    zeta = torch.cat(
        [
            torch.ones(b, n, dtype=torch.float64),
            torch.full((b, 1 + g), 1.0 / g, dtype=torch.float64),
        ],
        dim=1,
    )
    nu = torch.ones(b, n, dtype=torch.float64)

    converged = empty.clone()
    failed = torch.zeros(b, dtype=torch.bool)
    iterations = torch.zeros(b, dtype=torch.int64)
    n_compl = big_n + n

    def direction(
        chol: torch.Tensor,
        theta: torch.Tensor,
        r_p: torch.Tensor,
        r_u: torch.Tensor,
        r_d: torch.Tensor,
        r_zz: torch.Tensor,
        r_wn: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        h = r_d - r_zz / z
        h[:, :n] += (r_wn - nu * r_u) / wu
        rhs = r_p + (m @ (theta * h)[..., None]).squeeze(-1)
        dy = torch.cholesky_solve(rhs[..., None], chol).squeeze(-1)
        dz = theta * ((mt @ dy[..., None]).squeeze(-1) - h)
        # The normal equations lose about eps * max(theta) of accuracy near the optimum, enough
        # to stall the primal residual above the tolerance. Recovering the slack parts from the
        # primal rows and their dual rows keeps both residuals at rounding level.
        dz[:, n + 1 :] = (m[..., : n + 1] @ dz[:, : n + 1, None]).squeeze(-1) - r_p
        dzeta = (r_zz - zeta * dz) / z
        dzeta[:, n + 1 :] = r_d[:, n + 1 :] + dy
        dw = r_u - dz[:, :n]
        dnu = (r_wn - nu * dw) / wu
        return dz, dw, dy, dzeta, dnu

    for it in range(max_iter + 1):
        x = z[:, :n]
        r_p = c - (m @ z[..., None]).squeeze(-1)
        r_u = 1.0 - x - wu
        r_d = cost - (mt @ y[..., None]).squeeze(-1) - zeta
        r_d[:, :n] += nu
        compl = (z * zeta).sum(-1) + (wu * nu).sum(-1)
        gap = compl / (1.0 + z[:, n].abs())
        ok = (
            (r_p.abs().amax(-1) <= tol)
            & (r_u.abs().amax(-1) <= tol)
            & (r_d.abs().amax(-1) <= tol)
            & (gap <= tol)
        )
        active = ~(converged | failed)
        converged |= active & ok
        active &= ~ok
        if it == max_iter or not bool(active.any()):
            break
        iterations += active.to(torch.int64)
        mu = compl / n_compl

        theta_inv = zeta / z
        theta_inv[:, :n] += nu / wu
        theta = 1.0 / theta_inv
        k_mat = (m * theta[:, None, :]) @ mt
        diag = k_mat.diagonal(dim1=-2, dim2=-1)
        diag += NORMAL_REG * diag.amax(-1, keepdim=True)
        chol, info = torch.linalg.cholesky_ex(k_mat)
        failed |= active & (info != 0)
        active &= info == 0

        # Predictor (affine scaling) direction, then Mehrotra's centring + second-order corrector.
        aff = direction(chol, theta, r_p, r_u, r_d, -z * zeta, -wu * nu)
        dz_a, dw_a, _, dzeta_a, dnu_a = aff
        ap, ad = _step_lengths((z, wu, zeta, nu), (dz_a, dw_a, dzeta_a, dnu_a), 1.0)
        mu_aff = (
            ((z + ap[:, None] * dz_a) * (zeta + ad[:, None] * dzeta_a)).sum(-1)
            + ((wu + ap[:, None] * dw_a) * (nu + ad[:, None] * dnu_a)).sum(-1)
        ) / n_compl
        sigma_mu = ((mu_aff / mu) ** 3 * mu)[:, None]
        dz, dw, dy, dzeta, dnu = direction(
            chol,
            theta,
            r_p,
            r_u,
            r_d,
            sigma_mu - z * zeta - dz_a * dzeta_a,
            sigma_mu - wu * nu - dw_a * dnu_a,
        )
        ap, ad = _step_lengths((z, wu, zeta, nu), (dz, dw, dzeta, dnu), STEP_FRACTION)
        new = (
            z + ap[:, None] * dz,
            wu + ap[:, None] * dw,
            y + ad[:, None] * dy,
            zeta + ad[:, None] * dzeta,
            nu + ad[:, None] * dnu,
        )
        finite = torch.stack([v.isfinite().all(-1) for v in new]).all(0)
        failed |= active & ~finite
        active &= finite
        keep = active[:, None]
        z, wu, y, zeta, nu = (
            torch.where(keep, v1, v0) for v1, v0 in zip(new, (z, wu, y, zeta, nu), strict=True)
        )

    solved = converged & ~empty
    x = torch.where(solved[:, None], z[:, :n].clamp(0.0, 1.0), torch.full_like(z[:, :n], 0.5))
    return IpmResult(x.view(b, g, d), converged, iterations)


def solve(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
    *,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """Solve the LP of every EP group and count the groups that converged.

    Args:
        workload: [E] tokens per logical expert (any int/float dtype).
        phy2log: [R] integer, logical expert of each physical slot.
        r2o, o2r: [G, D] integer topology and its column-wise inverse.
        avail_counter: one-element int32/int64 tensor, incremented in place by the number of
            groups whose solve met the tolerance.
        n_local_logical, n_local_routed, n_combined: per-rank layout (docs/lp.md).
        max_iter: IPM iteration cap (tests lower it to force the failure fallback).

    Returns:
        probs: [n_group, G, D] float32, share of each replicated set kept on its original rank.
    """
    group_size, n_sets = r2o.shape
    if phy2log.numel() % (group_size * n_local_routed) != 0:
        raise ValueError(
            f"phy2log has {phy2log.numel()} slots, not a multiple of group_size * n_local_routed "
            f"= {group_size} * {n_local_routed}"
        )
    w, f = group_loads(
        workload, phy2log, group_size, n_sets, n_local_logical, n_local_routed, n_combined
    )
    result = ipm_solve(w, f, r2o, o2r, max_iter=max_iter)
    avail_counter += result.converged.sum().to(avail_counter.dtype)
    return result.x.to(torch.float32)


def map_idx(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
) -> torch.Tensor:
    """Map logical expert indices to physical slots, splitting replicated experts by `probs`.

    Token k (0-based, in flattened order) of a replicated expert with share x goes to the
    original slot when floor((k + 1) x + 1/2) > floor(k x + 1/2), else to the replica. Its global
    order k is the prefix count of its chunk plus its rank inside the chunk, so the result does
    not depend on the number of chunks.

    Args:
        idx: any shape, int32 or int64, values in [-1, E).
        probs: [n_group, G, D] float32 shares.
        workload_by_sm: [n_sms, E] integer inclusive running totals from `count_idx` on `idx`.
        log2phy: [E, 2] integer physical slot of the original and of the replica (-1 if none).
        prob_index: [E] integer flat index into `probs` of each expert's share, -1 if none.

    Returns:
        Physical slot of every entry, same shape and dtype as `idx`; -1 stays -1.

    Raises:
        ValueError: if an index lies outside [-1, E).
    """
    flat = _checked_flat(idx, workload_by_sm.shape[1])
    n = flat.numel()
    n_sms, n_logical = workload_by_sm.shape
    sm = _chunk_of_entries(n, n_sms)
    valid = flat >= 0
    expert = flat.clamp(min=0)

    # Rank of each entry among the entries of its (chunk, expert), in flattened order.
    key = sm * (n_logical + 1) + (flat + 1)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    run_start = torch.searchsorted(sorted_key, sorted_key)
    local = torch.empty_like(flat)
    local[order] = torch.arange(n, dtype=torch.int64) - run_start
    # Tokens of each expert in the chunks before this one: the previous inclusive row.
    before = torch.cat([workload_by_sm.new_zeros(1, n_logical), workload_by_sm[:-1]]).to(
        torch.int64
    )
    k = (before[sm, expert] + local).to(torch.float64)

    pidx = prob_index.to(torch.int64)[expert]
    share = probs.reshape(-1).to(torch.float64)[pidx.clamp(min=0)]
    to_original = (pidx < 0) | (torch.floor((k + 1) * share + 0.5) > torch.floor(k * share + 0.5))
    l2p = log2phy.to(torch.int64)[expert]
    target = torch.where(to_original, l2p[:, 0], l2p[:, 1])
    return torch.where(valid, target, -1).to(idx.dtype).view(idx.shape)
