"""Balance quality of LPLB on the CPU reference: max/mean rank load per EP group.

For each topology and redundancy, over many random workloads (tests/lp_oracle.py models:
normal noise of relative sigma 0.3 / 1.0, Zipf-shaped), compares
  none         identity layout, every token on its original (x = 1)
  reorder      layout reordered by EPLB from a load history, x = 1
  lplb         identity layout, shares from our LP solve
  lplb+reorder reordered layout, shares from our LP solve
  optimum      reordered layout, exact LP optimum (scipy HiGHS)
and records the relative error of our solve against the optimum and the IPM iteration counts.
Prints a markdown table and writes JSON (device, versions, command, numbers).

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lp_oracle import lp_loads, optimal_max_load, random_workloads  # noqa: E402

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, reference, torus_2d  # noqa: E402

N_LOGICAL = 256
TOPOLOGIES = [
    ("CUBE_8P2E", CUBE_8P2E, 32),
    ("CUBE_8P2E", CUBE_8P2E, 64),
    ("HYPERCUBE_16P2E", HYPERCUBE_16P2E, 16),
    ("RING_8P", RING_8P, 32),
    ("torus_2d(8,4)", torus_2d(8, 4), 32),
]
DRAWS_PER_HISTORY = 5


def _stacked_sets(
    planner: Planner, workloads: np.ndarray, phy2logs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [K * n_group, G, D] and F [K * n_group, G] of workload i on layout i, for all i."""
    offsets = torch.arange(len(phy2logs))[:, None] * N_LOGICAL
    return reference.group_loads(
        torch.from_numpy(workloads).reshape(-1),
        (torch.stack(phy2logs) + offsets).reshape(-1),
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
    results = {}
    per_layout = {}
    for layout, phy2logs in (("identity", [identity] * n_workloads), ("reorder", reordered)):
        w, f = _stacked_sets(planner, workloads, phy2logs)
        start = time.perf_counter()
        solved = reference.ipm_solve(w, f, r2o, planner.o2r)
        elapsed = time.perf_counter() - start
        # The op hands float32 shares to the mapping; measure what it would hand out.
        x = solved.x.to(torch.float32).double().numpy()
        w, f = w.numpy(), f.numpy()
        ours = lp_loads(w, f, x, r2o_np).max(-1)
        best = optimal_max_load(w, f, r2o_np)
        positive = best > 0
        per_layout[layout] = {
            "rel_err": _quantiles(np.abs(ours[positive] / best[positive] - 1.0)),
            "iterations": _quantiles(solved.iterations.double().numpy()),
            "failed_groups": int((~solved.converged).sum()),
            "solve_s_per_call": elapsed,
        }
        ones = np.ones_like(x)
        results["none" if layout == "identity" else "reorder"] = _imbalance(w, f, ones, r2o_np)
        results["lplb" if layout == "identity" else "lplb+reorder"] = _imbalance(w, f, x, r2o_np)
        if layout == "reorder":
            mean = lp_loads(w, f, ones, r2o_np).mean(-1)
            results["optimum"] = np.where(mean > 0, best / np.where(mean > 0, mean, 1.0), 1.0)
    return {
        "ep_size": ep,
        "redundant_per_rank": k,
        "n_workloads": n_workloads,
        "n_groups": int(n_workloads * planner.n_group),
        "max_over_mean": {name: float(v.mean()) for name, v in results.items()},
        "solver": per_layout,
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

    rows = []
    for name, r2o, ep in TOPOLOGIES:
        for k in range(r2o.shape[1], 5, r2o.shape[1]):
            res = bench_config(r2o, ep, k, args.workloads, args.seed + 100 * ep + k)
            rows.append({"topology": name, **res})

    columns = ["none", "reorder", "lplb", "lplb+reorder", "optimum"]
    print(f"mean max/mean rank load per group, {args.workloads} workloads per row, E={N_LOGICAL}")
    print("| topology | ep | k | " + " | ".join(columns) + " | rel. err max / p99 | iters max |")
    print("|---" * (len(columns) + 5) + "|")
    for row in rows:
        q = row["max_over_mean"]
        err = row["solver"]["reorder"]["rel_err"]
        iters = max(s["iterations"]["max"] for s in row["solver"].values())
        print(
            f"| {row['topology']} | {row['ep_size']} | {row['redundant_per_rank']} | "
            + " | ".join(f"{q[c]:.4f}" for c in columns)
            + f" | {err['max']:.1e} / {err['p99']:.1e} | {iters:.0f} |"
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
