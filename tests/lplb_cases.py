"""Workload and layout helpers shared by the LPLB solver tests (CPU and GPU).

The configurations, the workload models and the LP oracle itself are in lplb/oracle.py, which
bench/bench_quality.py uses too.
"""

import numpy as np
import torch

from lplb import Planner
from lplb.oracle import N_LOGICAL, random_workloads


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
