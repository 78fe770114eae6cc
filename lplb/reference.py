"""CPU reference backend of LPLB: token counting, the batched LP solve, and token mapping.

Implements exactly the contract of docs/lp.md in float64, so that it is the oracle the CUDA
kernels are held to. Counting and mapping are batched torch code; the LP of each EP group is
solved by the same augmenting-path steps as the kernel, in the same order of operations, on
Python floats (a group has at most 32 ranks and 4 sets per rank).
"""

import math
from dataclasses import dataclass

import torch

__all__ = ["FlowResult", "count_idx", "flow_solve", "group_loads", "map_idx", "solve"]

# Tolerances in scaled units (loads divided by the largest rank total), as in the kernel: a load
# above t by more than TOL_EXCESS is "over"; a share below TOL_CAPACITY cannot move any more.
TOL_EXCESS = 1e-12
TOL_CAPACITY = 1e-13
MAX_SEARCHES = 2048
SMOOTHING_ROUNDS = 4
# Share of a set without tokens, and of every set of a failed group.
EVEN_SHARE = 0.5
# Lanes of the kernel's warp, whose butterfly sums the reference reproduces.
WARP = 32


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
class FlowResult:
    """Outcome of `flow_solve` for B groups.

    Attributes:
        x: [B, G, D] float64 shares kept on the original rank, in [0, 1]; 0.5 for sets without
            tokens and for every set of a failed group.
        converged: [B] bool, the group reached the optimum (or had no tokens).
        searches: [B] int64, path searches taken (the cap for groups that did not converge).
    """

    x: torch.Tensor
    converged: torch.Tensor
    searches: torch.Tensor


def _warp_sum(values: list[float]) -> float:
    """Sum in the order of the kernel's 32-lane xor butterfly (lanes beyond the list add 0)."""
    v = values + [0.0] * (WARP - len(values))
    step = WARP // 2
    while step:
        v = [v[i] + v[i ^ step] for i in range(WARP)]
        step //= 2
    return v[0]


def _solve_group(
    w: list[list[float]],
    f: list[float],
    r2o: list[list[int]],
    o2r: list[list[int]],
    max_searches: int,
) -> tuple[list[list[float]], bool, int]:
    """One group's LP by augmenting paths (docs/lp.md, "Solver"), operation for operation as the
    kernel's lanes do it, so that both reach the same shares.

    Args:
        w: G rows of D replicated-set loads, f: G fixed loads (unscaled, finite or not).
        r2o, o2r: G rows of D ranks.

    Returns:
        (x as G rows of D shares, converged, searches taken).
    """
    g, n_sets = len(w), len(w[0])
    half = [[EVEN_SHARE] * n_sets for _ in range(g)]
    totals = []
    for r in range(g):
        total = f[r]  # summed in the kernel's order
        for v in w[r]:
            total += v
        totals.append(total)
    if not all(math.isfinite(v) for v in totals):
        return half, False, 0
    scale = max(totals)
    if not scale > 0.0:
        return half, True, 0  # no tokens: trivially balanced
    ws = [[v / scale for v in row] for row in w]
    fs = [v / scale for v in f]
    # own[r][d]: share of set (r, d) on rank r; held[r][d]: the same number for the set rank r
    # holds a replica of, (r2o[r][d], d) -- the kernel's per-lane copy.
    own = [[0.5 * v for v in row] for row in ws]
    held = [[own[r2o[r][d]][d] for d in range(n_sets)] for r in range(g)]
    loads = []
    for r in range(g):
        load = fs[r]
        for d in range(n_sets):
            load += own[r][d]
        for d in range(n_sets):
            load += ws[r2o[r][d]][d] - held[r][d]
        loads.append(load)
    # Smoothing (diffusion): every set moves 1/(4D) of its ranks' load difference to the lighter
    # rank, within its share; fewer and shorter paths are left to the searches.
    rate = 1.0 / (4 * n_sets)
    for _ in range(SMOOTHING_ROUNDS):
        moved = []
        for r in range(g):
            row = []
            for d in range(n_sets):
                m = (loads[r] - loads[o2r[r][d]]) * rate
                row.append(min(m, own[r][d]) if m > 0.0 else max(m, own[r][d] - ws[r][d]))
                own[r][d] -= row[d]
            moved.append(row)
        for r in range(g):
            for d in range(n_sets):
                loads[r] -= moved[r][d]
            for d in range(n_sets):
                came = moved[r2o[r][d]][d]
                held[r][d] -= came
                loads[r] += came
    t = max(max(fs), _warp_sum(loads) / g)

    searches = 0
    while True:
        excess = [load - t for load in loads]
        over = [e > TOL_EXCESS for e in excess]
        if not any(over):
            break
        if searches == max_searches:
            return half, False, searches
        searches += 1
        under = [e < -TOL_EXCESS for e in excess]
        visited, frontier = over[:], over[:]
        parent, via = [-1] * g, [-1] * g
        bottleneck = excess[:]
        sink = -1
        while sink < 0:
            fresh = []
            for v in range(g):
                if visited[v]:
                    continue
                for k in range(2 * n_sets):
                    d = k >> 1
                    src, cap = (
                        (o2r[v][d], ws[v][d] - own[v][d]) if k & 1 else (r2o[v][d], held[v][d])
                    )
                    if frontier[src] and cap > TOL_CAPACITY:
                        fresh.append((v, src, k, cap))
                        break
            if not fresh:
                break
            frontier = [False] * g
            for v, src, k, cap in fresh:
                parent[v], via[v] = src, k
                bottleneck[v] = min(bottleneck[src], cap)
                visited[v] = frontier[v] = True
            hits = [v for v, _, _, _ in fresh if under[v]]
            if hits:
                sink = min(hits)
        if sink < 0:
            # The reached ranks cannot shed load: their mean is a larger lower bound.
            members = [loads[r] if visited[r] else 0.0 for r in range(g)]
            t_new = _warp_sum(members) / sum(visited)
            if not t_new > t:
                break  # the excess left is below G * TOL_EXCESS
            t = t_new
            continue
        delta = min(bottleneck[sink], -excess[sink])
        v = sink
        while parent[v] >= 0:
            src, d = parent[v], via[v] >> 1
            if via[v] & 1:  # the holder src gave share of v's own set back
                own[v][d] += delta
                held[src][d] += delta
            else:  # the owner src gave share of its set to v
                held[v][d] -= delta
                own[src][d] -= delta
            v = src
        loads[v] -= delta
        loads[sink] += delta

    x = [
        [
            min(1.0, max(0.0, own[r][d] / ws[r][d])) if ws[r][d] > 0.0 else EVEN_SHARE
            for d in range(n_sets)
        ]
        for r in range(g)
    ]
    return x, True, searches


def flow_solve(
    w: torch.Tensor,
    f: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    max_searches: int = MAX_SEARCHES,
) -> FlowResult:
    """Solve B min-max-load LPs exactly by augmenting paths (docs/lp.md, "Solver").

    Args:
        w: [B, G, D] replicated-set loads, f: [B, G] fixed loads (any float dtype, unscaled).
        r2o: [G, D] topology, o2r: [G, D] its column-wise inverse (integer tensors).
        max_searches: cap on path searches per group (tests lower it to force failures).
    """
    b, g, d = w.shape
    r2o_rows = r2o.to(torch.int64).tolist()
    o2r_rows = o2r.to(torch.int64).tolist()
    w_rows = w.to(torch.float64).tolist()
    f_rows = f.to(torch.float64).tolist()
    xs, converged, searches = [], [], []
    for i in range(b):
        x, ok, n = _solve_group(w_rows[i], f_rows[i], r2o_rows, o2r_rows, max_searches)
        xs.append(x)
        converged.append(ok)
        searches.append(n)
    return FlowResult(
        torch.tensor(xs, dtype=torch.float64).view(b, g, d),
        torch.tensor(converged, dtype=torch.bool),
        torch.tensor(searches, dtype=torch.int64),
    )


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
    max_searches: int = MAX_SEARCHES,
) -> torch.Tensor:
    """Solve the LP of every EP group and count the groups that converged.

    Args:
        workload: [E] tokens per logical expert (any int/float dtype).
        phy2log: [R] integer, logical expert of each physical slot.
        r2o, o2r: [G, D] integer topology and its column-wise inverse.
        avail_counter: one-element int32/int64 tensor, incremented in place by the number of
            groups whose solve reached the optimum.
        n_local_logical, n_local_routed, n_combined: per-rank layout (docs/lp.md).
        max_searches: path-search cap per group (tests lower it to force the failure fallback).

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
    result = flow_solve(w, f, r2o, o2r, max_searches=max_searches)
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
