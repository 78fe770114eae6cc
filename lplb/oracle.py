"""Independent oracle for the LPLB linear program, and the workloads and configurations it is
checked and benchmarked on.

The LP is rebuilt here with plain loops from the load formula of docs/lp.md ("The LP"), not from
the matrices of lplb/reference.py, and solved exactly by scipy's HiGHS, so that tests and
bench/bench_quality.py compare two independent constructions. Nothing here is used by the
Planner at run time.

scipy is needed only by ``optimal_max_load`` and is imported there: it is a test and benchmark
dependency (``pip install moe-lplb[test]``), not a runtime one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lplb.topology import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, torus_2d

if TYPE_CHECKING:
    from lplb.planner import Planner

__all__ = [
    "KINDS",
    "N_LOGICAL",
    "REDUNDANCY_CONFIGS",
    "TOPOLOGIES",
    "lp_loads",
    "optimal_max_load",
    "random_workloads",
    "set_loads",
    "stack_layouts",
    "stacked_loads",
]

# Logical experts of the configurations below.
N_LOGICAL = 256
# The topologies the solver is checked (tests) and measured (bench/bench_quality.py) on:
# (display name, r2o [G, D], ep_size)
TOPOLOGIES = [
    ("CUBE_8P2E", CUBE_8P2E, 32),
    ("CUBE_8P2E", CUBE_8P2E, 64),
    ("HYPERCUBE_16P2E", HYPERCUBE_16P2E, 16),
    ("RING_8P", RING_8P, 32),
    ("torus_2d(8,4)", torus_2d(8, 4), 32),
]
# (display name, r2o, ep_size, k): redundant slots per rank k = 1..4 where the topology's D
# divides k.
REDUNDANCY_CONFIGS = [
    (name, r2o, ep, k) for name, r2o, ep in TOPOLOGIES for k in range(1, 5) if k % r2o.shape[1] == 0
]


# Groups per HiGHS call: the LPs of independent groups are stacked block-diagonally and the
# sum of their maximum loads minimised, which minimises each block's maximum separately.
BLOCKS_PER_CALL = 512


# Workload models, cycled over the workloads of `random_workloads`.
KINDS = ("normal-0.3", "normal-1.0", "zipf")


def random_workloads(
    rng: np.random.Generator,
    n_workloads: int,
    n_experts: int,
    n_draws: int = 1,
    tokens_per_expert: float = 512.0,
) -> np.ndarray:
    """Random per-expert token counts, `n_draws` samples of one popularity model per workload.

    Models (cycled): every expert with mean `tokens_per_expert` and normal noise of relative
    sigma 0.3 or 1.0, clamped at 0 and rounded; or Zipf-shaped means (exponent in [0.6, 1.4],
    random expert order) with Poisson noise. Drawing several samples of one model gives a load
    history and batches that follow it.

    Returns:
        [n_workloads, n_draws, n_experts] int64.
    """
    out = np.empty((n_workloads, n_draws, n_experts), dtype=np.int64)
    for i in range(n_workloads):
        kind = KINDS[i % len(KINDS)]
        if kind == "zipf":
            weight = 1.0 / np.arange(1, n_experts + 1) ** rng.uniform(0.6, 1.4)
            mean = rng.permutation(weight / weight.sum() * tokens_per_expert * n_experts)
            out[i] = rng.poisson(mean, size=(n_draws, n_experts))
        else:
            sigma = float(kind.split("-")[1]) * tokens_per_expert
            noisy = rng.normal(tokens_per_expert, sigma, size=(n_draws, n_experts))
            out[i] = np.rint(np.clip(noisy, 0.0, None))
    return out


def set_loads(
    workload: np.ndarray,
    phy2log: np.ndarray,
    group_size: int,
    n_sets: int,
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Replicated-set loads W and fixed loads F of every group, by walking the slots.

    Args:
        workload: [K, E] workloads sharing one layout.
        phy2log: [R] logical expert of each physical slot.

    Returns:
        W: [K, n_group, G, D] float64; F: [K, n_group, G] float64.
    """
    n_ranks = phy2log.shape[0] // n_local_routed
    n_group = n_ranks // group_size
    # Column of the (rank, set) or (rank, fixed) bucket each logical expert's tokens fall into.
    bucket = np.zeros((workload.shape[1], n_ranks * (n_sets + 1)))
    for rank in range(n_ranks):
        for slot in range(n_local_logical):
            expert = phy2log[rank * n_local_routed + slot]
            kind = slot % n_sets if slot < n_combined * n_sets else n_sets
            bucket[expert, rank * (n_sets + 1) + kind] += 1.0
    loads = (workload.astype(np.float64) @ bucket).reshape(-1, n_group, group_size, n_sets + 1)
    return loads[..., :n_sets], loads[..., n_sets]


def lp_loads(w: np.ndarray, f: np.ndarray, x: np.ndarray, r2o: np.ndarray) -> np.ndarray:
    """Rank loads `F[r] + sum_d x[r,d] W[r,d] + sum_d (1 - x[q,d]) W[q,d]` with q = r2o[r, d].

    Args:
        w: [..., G, D], f: [..., G], x: [..., G, D] shares, r2o: [G, D].

    Returns:
        [..., G] float64 loads.
    """
    group_size, n_sets = r2o.shape
    load = f + (x * w).sum(-1)
    for r in range(group_size):
        for d in range(n_sets):
            q = r2o[r, d]
            load[..., r] += (1.0 - x[..., q, d]) * w[..., q, d]
    return load


def optimal_max_load(w: np.ndarray, f: np.ndarray, r2o: np.ndarray) -> np.ndarray:
    """Exact optimum of min_x max_r load (x in [0,1]) per group, by HiGHS.

    Each group is scaled by its largest possible rank load before solving, so that HiGHS's
    absolute tolerances are relative ones.

    Args:
        w: [B, G, D], f: [B, G] nonnegative loads; r2o: [G, D] topology.

    Returns:
        [B] float64 optimal maximum rank loads (in the units of w and f).
    """
    w = np.asarray(w, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    scale = (f + w.sum(-1)).max(-1)
    safe = np.where(scale > 0, scale, 1.0)
    w = w / safe[:, None, None]
    f = f / safe[:, None]
    out = np.concatenate(
        [
            _solve_blocks(w[i : i + BLOCKS_PER_CALL], f[i : i + BLOCKS_PER_CALL], r2o)
            for i in range(0, w.shape[0], BLOCKS_PER_CALL)
        ]
    )
    return out * safe


def _scipy_linprog() -> tuple[Any, Any]:
    """``(scipy.optimize.linprog, scipy.sparse.csr_matrix)``, or ImportError saying what to do."""
    try:
        from scipy.optimize import linprog
        from scipy.sparse import csr_matrix
    except ImportError as error:
        raise ImportError(
            "lplb.oracle.optimal_max_load needs scipy (a test and benchmark dependency, not a "
            "runtime one): pip install scipy, or pip install 'moe-lplb[test]'"
        ) from error
    return linprog, csr_matrix


def _solve_blocks(w: np.ndarray, f: np.ndarray, r2o: np.ndarray) -> np.ndarray:
    """max load of the optimal x per block; variables per block: x[r, d] (G*D), then t."""
    linprog, csr_matrix = _scipy_linprog()
    n_blocks, group_size, n_sets = w.shape
    n_var = group_size * n_sets + 1
    rows, cols, vals = [], [], []
    rhs = np.empty((n_blocks, group_size))
    for r in range(group_size):
        rhs[:, r] = -f[:, r]
        for d in range(n_sets):
            q = r2o[r, d]
            # x[r, d] W[r, d] stays here; (1 - x[q, d]) W[q, d] arrives from rank q.
            rows += [r, r]
            cols += [r * n_sets + d, q * n_sets + d]
            vals += [w[:, r, d], -w[:, q, d]]
            rhs[:, r] -= w[:, q, d]
        rows.append(r)
        cols.append(n_var - 1)
        vals.append(-np.ones(n_blocks))
    base_r = np.arange(n_blocks)[:, None] * group_size
    base_c = np.arange(n_blocks)[:, None] * n_var
    a_ub = csr_matrix(
        (
            np.stack(vals, axis=1).ravel(),
            ((base_r + np.array(rows)).ravel(), (base_c + np.array(cols)).ravel()),
        ),
        shape=(n_blocks * group_size, n_blocks * n_var),
    )
    cost = np.zeros((n_blocks, n_var))
    cost[:, -1] = 1.0
    lower = np.tile(np.append(np.zeros(n_var - 1), -np.inf), n_blocks)
    upper = np.tile(np.append(np.ones(n_var - 1), np.inf), n_blocks)
    res = linprog(
        cost.ravel(),
        A_ub=a_ub,
        b_ub=rhs.ravel(),
        bounds=np.stack([lower, upper], axis=1),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    x = np.clip(res.x.reshape(n_blocks, n_var)[:, :-1], 0.0, 1.0).reshape(w.shape)
    return lp_loads(w, f, x, r2o).max(-1)


def stack_layouts(
    workloads: np.ndarray, phy2logs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Workload i on layout i becomes the groups of EP copy i, so that one call solves them all.

    Args:
        workloads: [K, E] tokens per logical expert.
        phy2logs: K layouts, each [R] logical expert (< E) of every physical slot.

    Returns:
        workload: [K * E] (dtype of `workloads`); phy2log: [K * R], layout i offset by i * E.
    """
    offsets = torch.arange(len(phy2logs))[:, None] * workloads.shape[1]
    phy2log = (torch.stack(list(phy2logs)) + offsets).reshape(-1)
    return torch.from_numpy(workloads).reshape(-1), phy2log


def stacked_loads(
    planner: Planner, workloads: np.ndarray, phy2logs: Sequence[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's (``set_loads``) LP inputs of workload i on layout i, for all i.

    Args:
        planner: gives the topology and the slot layout of one rank.
        workloads: [K, E] tokens per logical expert.
        phy2logs: K layouts, each [R] logical expert of every physical slot.

    Returns:
        W: [K * n_group, G, D] float64; F: [K * n_group, G] float64.
    """
    layout = (planner.group_size, planner.n_sets, planner.n_local_logical)
    layout += (planner.n_local_routed, planner.n_combined)
    parts = [set_loads(workloads[i : i + 1], p.numpy(), *layout) for i, p in enumerate(phy2logs)]
    w = np.concatenate([pw for pw, _ in parts]).reshape(-1, *planner.r2o.shape)
    f = np.concatenate([pf for _, pf in parts]).reshape(-1, planner.r2o.shape[0])
    return w, f
