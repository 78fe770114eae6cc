"""Balance quality of LPLB on the CPU reference: max/mean rank load per EP group.

For each topology and redundancy, over many random workloads (lplb/oracle.py models:
normal noise of relative sigma 0.3 / 1.0, Zipf-shaped), compares
  none         identity layout, every token on its original (x = 1)
  reorder      layout reordered by EPLB from a load history, x = 1
  lplb         identity layout, shares from our LP solve
  lplb+reorder reordered layout, shares from our LP solve
  optimum      reordered layout, exact LP optimum (scipy HiGHS)
and records the relative error of our solve against the optimum and the path searches per group.
Prints markdown tables (one per workload model) and writes JSON (device, versions, command,
numbers).

    python bench/bench_quality.py [--workloads 1000] [--out bench/results/quality_cpu.json]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from lplb import Planner, reference
from lplb.oracle import (
    KINDS,
    N_LOGICAL,
    REDUNDANCY_CONFIGS,
    lp_loads,
    optimal_max_load,
    random_workloads,
    stack_layouts,
)

ROOT = Path(__file__).resolve().parents[1]

DRAWS_PER_HISTORY = 5


def _stacked_sets(
    planner: Planner, workloads: np.ndarray, phy2logs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [K * n_group, G, D] and F [K * n_group, G] of workload i on layout i, for all i."""
    return reference.group_loads(
        *stack_layouts(workloads, phy2logs),
        planner.group_size,
        planner.n_sets,
        planner.n_local_logical,
        planner.n_local_routed,
        planner.n_combined,
    )


def _imbalance(w: np.ndarray, f: np.ndarray, x: np.ndarray, r2o: np.ndarray) -> np.ndarray:
    """max / mean rank load of each group ([B] float64); groups without tokens count as 1."""
    loads = lp_loads(w, f, x, r2o)
    mean = loads.mean(-1)
    return np.where(mean > 0, loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {
        "max": float(values.max()),
        "p99": float(np.quantile(values, 0.99)),
        "p50": float(np.quantile(values, 0.5)),
        "mean": float(values.mean()),
    }


def bench_config(r2o: torch.Tensor, ep: int, k: int, n_workloads: int, seed: int) -> dict:
    """Quality numbers of one (topology, ep_size, redundant slots per rank) configuration."""
    rng = np.random.default_rng(seed)
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    identity = planner.update_redundancy_mapping()[0]
    n_hist = -(-n_workloads // DRAWS_PER_HISTORY)
    drawn = random_workloads(rng, n_hist, N_LOGICAL, n_draws=1 + DRAWS_PER_HISTORY)
    reordered = [planner.update_redundancy_mapping(torch.from_numpy(h[0]))[0] for h in drawn]
    workloads = drawn[:, 1:].reshape(-1, N_LOGICAL)[:n_workloads]
    reordered = [p for p in reordered for _ in range(DRAWS_PER_HISTORY)][:n_workloads]

    r2o_np = r2o.numpy()
    imbalance = {}
    errors, searches = [], []
    failed = 0
    for layout, phy2logs in (("identity", [identity] * n_workloads), ("reorder", reordered)):
        w, f = _stacked_sets(planner, workloads, phy2logs)
        solved = reference.flow_solve(w, f, r2o, planner.o2r)
        # The op hands float32 shares to the mapping; measure what it would hand out.
        x = solved.x.to(torch.float32).double().numpy()
        w, f = w.numpy(), f.numpy()
        ours = lp_loads(w, f, x, r2o_np).max(-1)
        best = optimal_max_load(w, f, r2o_np)
        positive = best > 0
        errors.append(np.abs(ours[positive] / best[positive] - 1.0))
        searches.append(solved.searches.double().numpy())
        failed += int((~solved.converged).sum())
        ones = np.ones_like(x)
        imbalance["none" if layout == "identity" else "reorder"] = _imbalance(w, f, ones, r2o_np)
        imbalance["lplb" if layout == "identity" else "lplb+reorder"] = _imbalance(w, f, x, r2o_np)
        if layout == "reorder":
            mean = lp_loads(w, f, ones, r2o_np).mean(-1)
            imbalance["optimum"] = np.where(mean > 0, best / np.where(mean > 0, mean, 1.0), 1.0)

    # Workload j follows the model of history j // DRAWS_PER_HISTORY; one entry per group.
    kind = np.repeat(np.arange(n_workloads) // DRAWS_PER_HISTORY % len(KINDS), planner.n_group)
    return {
        "ep_size": ep,
        "redundant_per_rank": k,
        "n_workloads": n_workloads,
        "n_groups": int(kind.size),
        "max_over_mean": {
            KINDS[i]: {name: float(v[kind == i].mean()) for name, v in imbalance.items()}
            for i in range(len(KINDS))
        },
        "rel_err_vs_optimum": _quantiles(np.concatenate(errors)),
        "searches": _quantiles(np.concatenate(searches)),
        "failed_groups": failed,
    }


def _device() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor()} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=1000, help="workloads per config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/quality_cpu.json")
    args = parser.parse_args()
    if args.workloads < DRAWS_PER_HISTORY * len(KINDS):
        parser.error(f"--workloads must be >= {DRAWS_PER_HISTORY * len(KINDS)} (every model)")

    rows = []
    for name, r2o, ep, k in REDUNDANCY_CONFIGS:
        res = bench_config(r2o, ep, k, args.workloads, args.seed + 100 * ep + k)
        rows.append({"topology": name, **res})

    columns = ["none", "reorder", "lplb", "lplb+reorder", "optimum"]
    for kind in KINDS:
        print(f"\n{kind}: mean over groups of max/mean rank load in the group")
        print("| topology | ep | k | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 3) + "|")
        for row in rows:
            q = row["max_over_mean"][kind]
            print(
                f"| {row['topology']} | {row['ep_size']} | {row['redundant_per_rank']} | "
                + " | ".join(f"{q[c]:.4f}" for c in columns)
                + " |"
            )
    print("\nsolver: relative error of the max load vs HiGHS, path searches (all groups)")
    print(
        "| topology | ep | k | LPs | err max | err p99 | err p50 | searches max | searches p99 |"
        " searches mean | failed |"
    )
    print("|---" * 11 + "|")
    for row in rows:
        err, it = row["rel_err_vs_optimum"], row["searches"]
        print(
            f"| {row['topology']} | {row['ep_size']} | {row['redundant_per_rank']} | "
            f"{2 * row['n_groups']} | {err['max']:.1e} | {err['p99']:.1e} | {err['p50']:.1e} | "
            f"{it['max']:.0f} | {it['p99']:.0f} | {it['mean']:.1f} | {row['failed_groups']} |"
        )

    record = {
        "benchmark": "lplb balance quality (CPU reference solver vs HiGHS)",
        "device": _device(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "n_logical": N_LOGICAL,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
