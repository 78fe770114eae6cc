"""Configurations and stacking helpers shared by the LPLB solver tests and bench/bench_quality.py.

Unlike lp_oracle.py (numpy/scipy only, independent of lplb), this module builds on lplb: its
topologies and the layouts of a Planner.
"""

from collections.abc import Sequence

import numpy as np
import torch
from lp_oracle import random_workloads, set_loads

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, torus_2d

N_LOGICAL = 256
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


def plain_and_reordered(
    planner: Planner,
    rng: np.random.Generator,
    n_plain: int,
    n_histories: int,
    n_per_history: int,
) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Random workloads on the identity layout and on layouts reordered by a load history.

    The first `n_plain` workloads use the identity layout; then each of `n_histories` load
    histories reorders the planner's layout (EPLB) and `n_per_history` further draws of its
    model run on that layout. Leaves the planner on the last reordered layout.

    Returns:
        workloads: [n_plain + n_histories * n_per_history, N_LOGICAL] int64;
        phy2logs: one [R] layout per workload.
    """
    identity = planner.update_redundancy_mapping()[0]
    plain = random_workloads(rng, n_plain, N_LOGICAL)[:, 0]
    drawn = random_workloads(rng, n_histories, N_LOGICAL, n_draws=1 + n_per_history)
    reordered = [planner.update_redundancy_mapping(torch.from_numpy(h[0]))[0] for h in drawn]
    workloads = np.concatenate([plain, drawn[:, 1:].reshape(-1, N_LOGICAL)])
    phy2logs = [identity] * n_plain + [p for p in reordered for _ in range(n_per_history)]
    return workloads, phy2logs


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
    """The oracle's (lp_oracle.set_loads) LP inputs of workload i on layout i, for all i.

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
