"""Benchmark the LPLB CUDA kernels: the solve kernel per topology, and Planner.run with its parts.

Every number is the median GPU time per call from CUDA events around replays of a CUDA graph
that holds many calls back to back (after warm-up), so launch gaps are those of a graph. The
table goes to stdout and a JSON record (device, versions, command, numbers) to --out.

Usage: python bench/bench_lplb.py --out bench/results/lplb_h100.json
"""

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, torus_2d

N_LOGICAL = 256
TOP_K = 8
CUDA = torch.device("cuda")
# (name, topology, ep_size, redundant slots per rank)
SOLVE_CONFIGS = [
    ("CUBE_8P2E ep32", CUBE_8P2E, 32, 2),
    ("CUBE_8P2E ep64", CUBE_8P2E, 64, 2),
    ("HYPERCUBE_16P2E ep16", HYPERCUBE_16P2E, 16, 2),
    ("RING_8P ep32", RING_8P, 32, 1),
    ("torus_2d(8,4) ep32", torus_2d(8, 4), 32, 2),
]
RUN_ROWS = (4096, 16384, 131072)
# Reference points (DESIGN.md: DeepSeek LPLB on an H100) and this project's targets, in us.
DEEPSEEK_SOLVE_US = {
    "CUBE_8P2E ep32": 40.0,
    "HYPERCUBE_16P2E ep16": 137.0,
    "torus_2d(8,4) ep32": 415.0,
    "RING_8P ep32": 26.0,
}
TARGETS = {"solve CUBE_8P2E ep32": 10.0, "Planner.run [16384, 8]": 30.0}


def time_graph(fn: Callable[[], object], calls: int, replays: int) -> float:
    """Median microseconds per call of `fn`, captured `calls` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return float(np.median(times))


def random_workloads(rng: np.random.Generator, n: int) -> list[torch.Tensor]:
    """Per-expert token counts around 512 with log-normal skew, int32 on the GPU."""
    return [
        torch.from_numpy(np.rint(rng.lognormal(0.0, 0.7, N_LOGICAL) * 512).astype(np.int32)).to(
            CUDA
        )
        for _ in range(n)
    ]


def topk_idx(rows: int, seed: int) -> torch.Tensor:
    """[rows, TOP_K] int64 expert indices from skewed random router scores."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    bias = torch.randn(N_LOGICAL, device=CUDA, generator=gen) * 1.5
    idx = torch.empty((rows, TOP_K), dtype=torch.int64, device=CUDA)
    for lo in range(0, rows, 16384):
        hi = min(rows, lo + 16384)
        scores = torch.randn(hi - lo, N_LOGICAL, device=CUDA, generator=gen) + bias
        idx[lo:hi] = scores.topk(TOP_K, dim=1).indices
    return idx


def bench_solve(calls: int, replays: int, n_workloads: int) -> dict[str, dict[str, float]]:
    """Solve kernel alone per topology: median over workloads of the per-call median."""
    rng = np.random.default_rng(0)
    out = {}
    for name, r2o, ep, k in SOLVE_CONFIGS:
        planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
        counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
        per_workload, converged = [], True
        for workload in random_workloads(rng, n_workloads):
            fresh = torch.zeros(1, dtype=torch.int64, device=CUDA)
            planner.solve_probs(workload, fresh)
            converged &= int(fresh) == planner.n_group
            per_workload.append(
                time_graph(
                    lambda w=workload, p=planner, c=counter: p.solve_probs(w, c), calls, replays
                )
            )
        out[name] = {
            "median_us": float(np.median(per_workload)),
            "min_us": float(np.min(per_workload)),
            "max_us": float(np.max(per_workload)),
            "n_group": planner.n_group,
            "group_size": planner.group_size,
            "n_sets": planner.n_sets,
            "all_groups_converged": converged,
        }
    return out


def bench_planner(calls: int, replays: int) -> dict[str, dict[str, float]]:
    """Planner.run on CUBE_8P2E, ep 32, and its parts, for each idx size."""
    planner = Planner(CUBE_8P2E, N_LOGICAL + 2 * 32, N_LOGICAL, ep_size=32)
    n_sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out = {}
    for rows in RUN_ROWS:
        idx = topk_idx(rows, seed=rows)
        workload, by_sm = planner.count_workload(idx, n_sms)
        probs, _ = planner.solve_probs(workload, counter)
        copy_dst = torch.empty_like(idx)
        out[f"[{rows}, {TOP_K}]"] = {
            "run_us": time_graph(lambda i=idx: planner.run(i, counter, n_sms), calls, replays),
            "count_us": time_graph(lambda i=idx: planner.count_workload(i, n_sms), calls, replays),
            "solve_us": time_graph(
                lambda w=workload: planner.solve_probs(w, counter), calls, replays
            ),
            "map_us": time_graph(
                lambda i=idx, p=probs, b=by_sm: planner.weighted_select_target(i, p, b, n_sms),
                calls,
                replays,
            ),
            "copy_idx_us": time_graph(lambda i=idx, d=copy_dst: d.copy_(i), calls, replays),
            "idx_bytes": idx.numel() * idx.element_size(),
        }
    return out


def tiny_kernel_us(calls: int, replays: int) -> float:
    """Per-kernel cost of a one-element add in the same graph setup: the launch floor."""
    x = torch.zeros(1, device=CUDA)
    return time_graph(lambda: x.add_(1.0), calls, replays)


def versions() -> dict[str, str]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as err:
            return f"unavailable ({err})"

    nvcc = run(["nvcc", "--version"]).splitlines()
    return {
        "device": torch.cuda.get_device_name(CUDA),
        "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "nvcc": nvcc[-1] if nvcc else "unavailable",
        "sm_count": str(torch.cuda.get_device_properties(CUDA).multi_processor_count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/lplb_h100.json"))
    parser.add_argument("--calls", type=int, default=20, help="calls captured per graph")
    parser.add_argument("--replays", type=int, default=200, help="timed graph replays")
    parser.add_argument("--workloads", type=int, default=8, help="workloads per solve config")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_lplb.py needs a CUDA GPU")

    record = {
        **versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "calls_per_graph": args.calls,
        "replays": args.replays,
        "tiny_kernel_us": tiny_kernel_us(args.calls, args.replays),
        "solve": bench_solve(args.calls, args.replays, args.workloads),
        "planner": bench_planner(args.calls, args.replays),
        "targets_us": TARGETS,
        "deepseek_lplb_h100_us": {
            **{f"solve {k}": v for k, v in DEEPSEEK_SOLVE_US.items()},
            "Planner.run [16384, 8]": 77.0,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{record['device']}  driver {record['driver']}  torch {record['torch']}")
    print(f"tiny kernel (launch floor in a graph): {record['tiny_kernel_us']:.2f} us")
    print(f"{'solve kernel':<24}{'median us':>10}{'min':>8}{'max':>8}{'DeepSeek':>10}")
    for name, row in record["solve"].items():
        ref = DEEPSEEK_SOLVE_US.get(name)
        ref_s = f"{ref:>10.0f}" if ref else f"{'-':>10}"
        print(
            f"{name:<24}{row['median_us']:>10.2f}{row['min_us']:>8.2f}{row['max_us']:>8.2f}{ref_s}"
        )
    print(f"{'CUBE_8P2E ep32 idx':<20}{'run':>8}{'count':>8}{'solve':>8}{'map':>8}{'copy':>8}")
    for name, row in record["planner"].items():
        cols = ("run_us", "count_us", "solve_us", "map_us", "copy_idx_us")
        print(f"{name:<20}" + "".join(f"{row[c]:>8.2f}" for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
