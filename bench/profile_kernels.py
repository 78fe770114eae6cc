"""Launch each lplb kernel a few times, for a profiler to attach to (not a benchmark).

    ncu --clock-control none --kernel-name regex:'map_idx|solve_kernel|chunk' \
        --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        python3 bench/profile_kernels.py

count_idx and map_idx at idx [131072, 8] int64 (bench_lplb's router scores), then the solve
kernel of CUBE_8P2E ep 32, HYPERCUBE_16P2E ep 16 and torus_2d(8, 4) ep 32 on bench_lplb's
log-normal workloads. Timings belong to bench/bench_lplb.py.
"""

from __future__ import annotations

import numpy as np
import torch
from bench_lplb import CUDA, N_LOGICAL, main_planner, random_workloads, topk_idx

from lplb import HYPERCUBE_16P2E, Planner, torus_2d

LAUNCHES = 4


def main() -> None:
    planner = main_planner()
    n_sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    idx = topk_idx(131072, seed=131072)
    workload, by_sm = planner.count_workload(idx, n_sms)
    probs, _ = planner.solve_probs(workload, counter)
    for _ in range(LAUNCHES):
        planner.count_workload(idx, n_sms)
        planner.weighted_select_target(idx, probs, by_sm, n_sms)
    layouts = [
        planner,
        Planner(HYPERCUBE_16P2E, N_LOGICAL + 2 * 16, N_LOGICAL, ep_size=16),
        Planner(torus_2d(8, 4), N_LOGICAL + 2 * 32, N_LOGICAL, ep_size=32),
    ]
    workload = random_workloads(np.random.default_rng(0), 1)[0]
    for layout in layouts:
        for _ in range(LAUNCHES):
            layout.solve_probs(workload, counter)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
