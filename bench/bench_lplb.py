"""Benchmark LPLB on one GPU: every row of the speed table of docs/kernels.md, in one run.

Setup unless said otherwise: CUBE_8P2E, ep 32, 2 redundant slots per rank, E = 256 logical
experts, idx [16384, 8] int64 (top-8 of skewed random router scores). Methods (each number in
the output carries its own):

* eager: wall clock of ``run(); torch.cuda.synchronize()`` per call (time.perf_counter_ns),
  median of 200 calls after 50 warm-up calls; also the host time until ``run`` returns. The
  default ``Planner.run`` (fast path) and the custom-op path (``Planner._run_ops``) side by side,
  plus the floor of the method (an empty call, and one tiny kernel, then synchronise).
* graph, one call per replay: CUDA events around each replay of a graph that holds one call,
  median of 200 replays after 10.
* back to back: a graph holding 20 calls, events around each replay divided by 20, median of 200
  replays (kernel time plus in-graph launch gaps; what "kernel alone" means below).

The table goes to stdout, and a JSON record (device, driver, torch, nvcc, command, every number
with its method) to --out (default bench/results/lplb_<gpu>.json). A section that fails is
recorded as an error, the others still run, and the exit status is 1.

Usage: python bench/bench_lplb.py [--out bench/results/lplb_h100.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eplb.fileio import atomic_write_text
from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, torus_2d
from lplb.fast_path import default_backend

N_LOGICAL = 256
TOP_K = 8
CUDA = torch.device("cuda")
EAGER_WARMUP, EAGER_CALLS = 50, 200
GRAPH_WARMUP, GRAPH_REPLAYS = 10, 200
# (name, topology, ep_size, redundant slots per rank)
SOLVE_CONFIGS = [
    ("CUBE_8P2E ep32", CUBE_8P2E, 32, 2),
    ("CUBE_8P2E ep64", CUBE_8P2E, 64, 2),
    ("HYPERCUBE_16P2E ep16", HYPERCUBE_16P2E, 16, 2),
    ("RING_8P ep32", RING_8P, 32, 1),
    ("torus_2d(8,4) ep32", torus_2d(8, 4), 32, 2),
]
RUN_ROWS = (4096, 16384, 131072)
MAIN_ROWS = 16384
# DeepSeek LPLB on an H100 (issue 11's table, measured side by side earlier) and the targets, us.
DEEPSEEK_US = {
    "run eager": "111-114",
    "run graph replay": 77.0,
    "solve CUBE_8P2E ep32": 40.0,
    "solve HYPERCUBE_16P2E ep16": 137.0,
    "solve torus_2d(8,4) ep32": 415.0,
    "solve RING_8P ep32": 26.0,
}
TARGETS_US = {
    "run eager": 40.0,
    "run graph replay": 20.0,
    "solve CUBE_8P2E ep32": 10.0,
    "solve HYPERCUBE_16P2E ep16": 15.0,
    "solve torus_2d(8,4) ep32": 60.0,
}
MAP_TARGET_RATIO = 2.0  # map_idx at [131072, 8] within 2x a device copy of idx

METHOD_EAGER = (
    f"wall clock of run + torch.cuda.synchronize() per call, median of {EAGER_CALLS} after "
    f"{EAGER_WARMUP} warm-up calls"
)
METHOD_REPLAY = (
    f"CUDA events around each replay of a graph holding one call, median of {GRAPH_REPLAYS} "
    f"replays after {GRAPH_WARMUP}"
)


def method_back_to_back(calls: int) -> str:
    return (
        f"CUDA events around replays of a graph holding {calls} calls back to back, per call, "
        f"median of {GRAPH_REPLAYS} replays after {GRAPH_WARMUP}"
    )


def eager_times(fn: Callable[[], object]) -> dict[str, float]:
    """Synchronised wall clock and host time per call, in us (see METHOD_EAGER)."""
    for _ in range(EAGER_WARMUP):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    wall, host = [], []
    for _ in range(EAGER_CALLS):
        t0 = time.perf_counter_ns()
        fn()
        t1 = time.perf_counter_ns()
        torch.cuda.synchronize()
        t2 = time.perf_counter_ns()
        wall.append((t2 - t0) / 1e3)
        host.append((t1 - t0) / 1e3)
    return {
        "median_us": float(np.median(wall)),
        "p10_us": float(np.percentile(wall, 10)),
        "p90_us": float(np.percentile(wall, 90)),
        "host_median_us": float(np.median(host)),
    }


def graph_times(
    fn: Callable[[], object],
    calls: int,
    replays: int = GRAPH_REPLAYS,
    *,
    capture_error_mode: str = "global",
    before_timing: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Per-call GPU time of ``fn`` captured ``calls`` times in one CUDA graph, in us.

    ``capture_error_mode`` goes to ``torch.cuda.graph`` (collectives need ``"thread_local"`` so
    NCCL's watchdog thread may keep polling); ``before_timing`` runs after the warm-up replays,
    once the device is idle (e.g. a barrier so every rank times the same replays).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        for _ in range(calls):
            fn()
    for _ in range(GRAPH_WARMUP):
        graph.replay()
    if before_timing is not None:
        torch.cuda.synchronize()
        before_timing()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return {
        "median_us": float(np.median(times)),
        "p10_us": float(np.percentile(times, 10)),
        "p90_us": float(np.percentile(times, 90)),
    }


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


def main_planner() -> Planner:
    return Planner(CUBE_8P2E, N_LOGICAL + 2 * 32, N_LOGICAL, ep_size=32)


def bench_floor(calls: int) -> dict[str, object]:
    """What the methods cost with (almost) nothing to measure."""
    x = torch.zeros(1, device=CUDA)
    return {
        "eager_empty_call": {**eager_times(lambda: None), "method": METHOD_EAGER},
        "eager_one_tiny_kernel": {**eager_times(lambda: x.add_(1.0)), "method": METHOD_EAGER},
        "graph_one_tiny_kernel_replay": {
            **graph_times(lambda: x.add_(1.0), 1),
            "method": METHOD_REPLAY,
        },
        "graph_tiny_kernel_back_to_back": {
            **graph_times(lambda: x.add_(1.0), calls),
            "method": method_back_to_back(calls),
        },
    }


def bench_eager() -> dict[str, object]:
    """Planner.run eager per idx size: fast path (default) and custom-op path."""
    planner = main_planner()
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out: dict[str, object] = {"method": METHOD_EAGER}
    for rows in RUN_ROWS:
        idx = topk_idx(rows, seed=rows)
        fast = eager_times(lambda i=idx: planner.run(i, counter))
        ops = eager_times(lambda i=idx: planner._run_ops(i, counter, None))
        out[f"[{rows}, {TOP_K}]"] = {"fast_path": fast, "custom_ops": ops}
    out["fast_path_active"] = default_backend() is not None and len(planner._fast) > 0
    return out


def bench_graph(calls: int) -> dict[str, object]:
    """Planner.run in a CUDA graph, one call per replay and back to back, per idx size."""
    planner = main_planner()
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out: dict[str, object] = {}
    for rows in RUN_ROWS:
        idx = topk_idx(rows, seed=rows)
        out[f"[{rows}, {TOP_K}]"] = {
            "one_call_per_replay": {
                **graph_times(lambda i=idx: planner.run(i, counter), 1),
                "method": METHOD_REPLAY,
            },
            "back_to_back": {
                **graph_times(lambda i=idx: planner.run(i, counter), calls),
                "method": method_back_to_back(calls),
            },
        }
    return out


def solve_kernel(planner: Planner, workload: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The solve op alone (what `run` launches): `solve_probs` also hands back a float32 copy of
    the workload, one more kernel that is not the solver's."""
    return planner._solve(workload, counter)[0]


def bench_parts(calls: int) -> dict[str, object]:
    """count, solve, map_idx and a device copy of idx, back to back, per idx size."""
    planner = main_planner()
    n_sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out: dict[str, object] = {"method": method_back_to_back(calls), "n_sms": n_sms}
    for rows in RUN_ROWS:
        idx = topk_idx(rows, seed=rows)
        workload, by_sm = planner.count_workload(idx, n_sms)
        probs, _ = planner.solve_probs(workload, counter)
        copy_dst = torch.empty_like(idx)
        times = {
            "count": graph_times(lambda i=idx: planner.count_workload(i, n_sms), calls),
            "solve": graph_times(lambda w=workload: solve_kernel(planner, w, counter), calls),
            "map_idx": graph_times(
                lambda i=idx, p=probs, b=by_sm: planner.weighted_select_target(i, p, b, n_sms),
                calls,
            ),
            "copy_idx": graph_times(lambda i=idx, d=copy_dst: d.copy_(i), calls),
        }
        out[f"[{rows}, {TOP_K}]"] = {
            **{f"{k}_us": v["median_us"] for k, v in times.items()},
            "idx_bytes": idx.numel() * idx.element_size(),
        }
    return out


def bench_solve(calls: int, n_workloads: int) -> dict[str, object]:
    """Solve kernel alone per topology: median over workloads of the per-call median."""
    rng = np.random.default_rng(0)
    out: dict[str, object] = {
        "method": method_back_to_back(calls) + f"; median over {n_workloads} workloads",
    }
    for name, r2o, ep, k in SOLVE_CONFIGS:
        planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
        counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
        per_workload, converged = [], True
        for workload in random_workloads(rng, n_workloads):
            fresh = torch.zeros(1, dtype=torch.int64, device=CUDA)
            planner.solve_probs(workload, fresh)
            converged &= int(fresh) == planner.n_group
            solve = lambda w=workload, p=planner, c=counter: solve_kernel(p, w, c)  # noqa: E731
            per_workload.append(graph_times(solve, calls)["median_us"])
        out[name] = {
            "median_us": float(np.median(per_workload)),
            "min_us": float(np.min(per_workload)),
            "max_us": float(np.max(per_workload)),
            "n_group": planner.n_group,
            "group_size": planner.group_size,
            "n_sets": planner.n_sets,
            "all_groups_converged": bool(converged),
        }
    return out


def summary(record: dict[str, object]) -> list[dict[str, object]]:
    """The rows of the issue's table from the sections that ran (missing sections skipped)."""
    rows: list[dict[str, object]] = []
    key = f"[{MAIN_ROWS}, {TOP_K}]"

    def add(name: str, measured: float, method: str, target: float | None, ref: object) -> None:
        rows.append(
            {
                "row": name,
                "measured_us": round(measured, 2),
                "method": method,
                "target_us": target,
                "target_met": None if target is None else bool(measured <= target),
                "deepseek_lplb_h100_us": ref,
            }
        )

    eager = record.get("eager")
    if isinstance(eager, dict) and key in eager:
        add(
            f"Planner.run eager {key} (fast path)",
            eager[key]["fast_path"]["median_us"],
            eager["method"],
            TARGETS_US["run eager"],
            DEEPSEEK_US["run eager"],
        )
        add(
            f"Planner.run eager {key} (custom ops, the previous path)",
            eager[key]["custom_ops"]["median_us"],
            eager["method"],
            None,
            DEEPSEEK_US["run eager"],
        )
    graph = record.get("graph")
    if isinstance(graph, dict) and key in graph:
        for kind, target in (
            ("one_call_per_replay", TARGETS_US["run graph replay"]),
            ("back_to_back", None),
        ):
            row = graph[key][kind]
            add(
                f"Planner.run {key} in a CUDA graph, {kind.replace('_', ' ')}",
                row["median_us"],
                row["method"],
                target,
                DEEPSEEK_US["run graph replay"] if target else None,
            )
    solve = record.get("solve")
    if isinstance(solve, dict):
        for name in ("CUBE_8P2E ep32", "HYPERCUBE_16P2E ep16", "torus_2d(8,4) ep32"):
            if name in solve:
                add(
                    f"solve kernel {name}",
                    solve[name]["median_us"],
                    solve["method"],
                    TARGETS_US[f"solve {name}"],
                    DEEPSEEK_US[f"solve {name}"],
                )
    parts = record.get("parts")
    big = f"[{RUN_ROWS[-1]}, {TOP_K}]"
    if isinstance(parts, dict) and big in parts:
        copy_us = parts[big]["copy_idx_us"]
        add(
            f"map_idx {big} (device copy of idx: {copy_us:.2f} us)",
            parts[big]["map_idx_us"],
            parts["method"],
            MAP_TARGET_RATIO * copy_us,
            None,
        )
    return rows


def versions() -> dict[str, str]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, check=True, timeout=60
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            return f"unavailable ({err})"

    nvcc = "unavailable"
    for exe in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        lines = run([exe, "--version"]).splitlines()
        if lines and not lines[0].startswith("unavailable"):
            nvcc = lines[-1]
            break
    props = torch.cuda.get_device_properties(CUDA)
    return {
        "device": torch.cuda.get_device_name(CUDA),
        "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "nvcc": nvcc,
        "python": sys.version.split()[0],
        "sm_count": str(props.multi_processor_count),
    }


def gpu_tag(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; the file name of the record."""
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", device_name.lower())
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def print_report(record: dict[str, object]) -> None:
    print(
        f"{record['device']}  driver {record['driver']}  torch {record['torch']}  {record['nvcc']}"
    )
    print(f"command: {record['command']}")
    for row in record["summary"]:
        target = row["target_us"]
        verdict = (
            ""
            if target is None
            else f"  target <= {target:.1f} us: {'met' if row['target_met'] else 'MISSED'}"
        )
        ref = row["deepseek_lplb_h100_us"]
        ref_s = "" if ref is None else f"  (DeepSeek LPLB {ref} us)"
        print(f"{row['row']}: {row['measured_us']:.2f} us{verdict}{ref_s}")
        print(f"    method: {row['method']}")
    for name, err in record["errors"].items():
        print(f"section {name} FAILED: {err.splitlines()[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/results/lplb_<gpu>.json"
    )
    parser.add_argument("--calls", type=int, default=20, help="calls per back-to-back graph")
    parser.add_argument("--workloads", type=int, default=8, help="workloads per solve config")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_lplb.py needs a CUDA GPU")

    started = time.perf_counter()
    record: dict[str, object] = {
        **versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "fast_path_built": default_backend() is not None,
        "setup": (
            f"CUBE_8P2E, ep 32, 2 redundant slots per rank, E = {N_LOGICAL}, idx [rows, {TOP_K}] "
            "int64 top-8 of skewed random scores; solve: log-normal workloads around 512 tokens"
        ),
    }
    errors: dict[str, str] = {}
    sections = {
        "floor": lambda: bench_floor(args.calls),
        "eager": bench_eager,
        "graph": lambda: bench_graph(args.calls),
        "parts": lambda: bench_parts(args.calls),
        "solve": lambda: bench_solve(args.calls, args.workloads),
    }
    for name, section in sections.items():
        try:
            record[name] = section()
        except Exception:  # recorded; the other sections still run
            errors[name] = traceback.format_exc()
            torch.cuda.synchronize()
    record["summary"] = summary(record)
    record["errors"] = errors
    record["targets_us"] = {**TARGETS_US, "map_idx [131072, 8]": f"<= {MAP_TARGET_RATIO}x copy"}
    record["deepseek_lplb_h100_us"] = DEEPSEEK_US
    record["seconds"] = round(time.perf_counter() - started, 1)

    out = args.out or Path("bench/results") / f"lplb_{gpu_tag(str(record['device']))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print_report(record)
    print(f"wrote {out} in {record['seconds']} s")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
