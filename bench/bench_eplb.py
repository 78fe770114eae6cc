"""Speed and balance of EPLB: plain-loop reference vs our DeepSeek-exact and balanced policies.

For DeepSeek-V3 scale (58 layers, 256 experts; hierarchical 288 replicas / 8 groups / 4 nodes /
32 GPUs, and global 320 replicas / 64 GPUs) and a small configuration, on log-normal and Zipf(1.1)
loads, measures the median time of
  reference   eplb/reference.py, the plain-loop DeepSeek algorithm
  deepseek    eplb.rebalance_experts(policy="deepseek") (checked identical to the reference)
  balanced    eplb.rebalance_experts(policy="balanced")
  original    deepseek-ai/EPLB eplb.py itself, when --original PATH names a local copy of it
and each one's balancedness (mean GPU load / max GPU load; mean and min over layers) and GPU rows
that hold an expert twice. Prints a markdown table and writes JSON (device, versions, command,
numbers).

    python bench/bench_eplb.py [--runs 30] [--reference-runs 3] [--original PATH]
                               [--out bench/results/eplb_cpu.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import eplb
from eplb.metrics import balancedness, count_duplicate_rows, gpu_loads
from eplb.reference import rebalance_experts as reference_loop

ROOT = Path(__file__).resolve().parents[1]

# name -> (layers, experts, replicas, groups, nodes, gpus)
CONFIGS = {
    "deepseek-v3 hierarchical": (58, 256, 288, 8, 4, 32),
    "deepseek-v3 global": (58, 256, 320, 1, 1, 64),
    "small hierarchical": (8, 64, 80, 8, 2, 16),
}
LOADS = ("lognormal", "zipf1.1")
balanced = functools.partial(eplb.rebalance_experts, policy="balanced")


def make_loads(kind: str, layers: int, experts: int, seed: int) -> torch.Tensor:
    """Loads per (layer, expert), float32 scaled to a mean of 1000: log-normal(0, 1), or Zipf(1.1)
    over a random expert order. Real token counts are integers and then tie now and then; ties are
    where DeepSeek's code (torch's unstable sort) and the stable order may differ, so the loads
    here are left unrounded."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        raw = torch.randn(layers, experts, generator=gen).exp()
    else:
        rank = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)]) + 1
        raw = rank.float() ** -1.1
    return raw / raw.mean(1, keepdim=True) * 1000


def measure(
    fn: Callable[..., tuple[torch.Tensor, ...]], weight: torch.Tensor, shape: tuple, runs: int
) -> tuple[dict[str, object], tuple[torch.Tensor, ...]]:
    """Median time of ``fn(weight, *shape)`` over ``runs`` calls, the balance of its result, and
    the result."""
    out = fn(weight, *shape)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(weight, *shape)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), **quality(weight, out[0], shape[3])}, out


def quality(weight: torch.Tensor, phy2log: torch.Tensor, gpus: int) -> dict[str, float]:
    b = balancedness(gpu_loads(weight, phy2log, gpus))
    return {
        "balancedness_mean": float(b.mean()),
        "balancedness_min": float(b.min()),
        "duplicate_rows": count_duplicate_rows(phy2log, gpus),
        "gpu_rows": phy2log.shape[0] * gpus,
    }


def load_original(path: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    spec = importlib.util.spec_from_file_location("deepseek_eplb_original", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rebalance_experts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs of our policies")
    parser.add_argument("--reference-runs", type=int, default=3, help="timed runs of the loops")
    parser.add_argument("--original", help="path of deepseek-ai/EPLB eplb.py to time as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/eplb_cpu.json"))
    args = parser.parse_args()
    original = load_original(args.original) if args.original else None

    rows = []
    print(TABLE_HEADER)
    for name, (layers, experts, replicas, groups, nodes, gpus) in CONFIGS.items():
        shape = (replicas, groups, nodes, gpus)
        for kind in LOADS:
            weight = make_loads(kind, layers, experts, args.seed)
            impls = {}
            impls["reference"], ref = measure(reference_loop, weight, shape, args.reference_runs)
            impls["deepseek"], ours = measure(eplb.rebalance_experts, weight, shape, args.runs)
            impls["deepseek"]["identical_to_reference"] = all(
                torch.equal(a, b) for a, b in zip(ours, ref, strict=True)
            )
            impls["balanced"], _ = measure(balanced, weight, shape, args.runs)
            if original is not None:
                impls["original"], out = measure(original, weight, shape, args.reference_runs)
                impls["original"]["same_phy2log_as_reference"] = torch.equal(out[0], ref[0])
            for impl in impls.values():
                impl["speedup_vs_reference"] = impls["reference"]["seconds"] / impl["seconds"]
                if original is not None:
                    impl["speedup_vs_original"] = impls["original"]["seconds"] / impl["seconds"]
            rows.append(
                {
                    "config": name,
                    "layers": layers,
                    "experts": experts,
                    "replicas": replicas,
                    "groups": groups,
                    "nodes": nodes,
                    "gpus": gpus,
                    "loads": kind,
                    "implementations": impls,
                }
            )
            print_row(rows[-1])

    result = {
        "benchmark": "eplb rebalance_experts speed and balance (CPU)",
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} threads)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"runs": args.runs, "reference_runs": args.reference_runs, "seed": args.seed},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


TABLE_HEADER = (
    "| config | loads | implementation | time | speed-up vs loops | speed-up vs original "
    "| balancedness mean / min | repeated GPU rows |\n|---|---|---|---:|---:|---:|---|---:|"
)


def print_row(row: dict) -> None:
    for impl_name, impl in row["implementations"].items():
        seconds = impl["seconds"]
        time_text = f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
        vs_original = impl.get("speedup_vs_original")
        print(
            f"| {row['config']} | {row['loads']} | {impl_name} | {time_text} "
            f"| {impl['speedup_vs_reference']:.3g}x "
            f"| {'-' if vs_original is None else f'{vs_original:.3g}x'} "
            f"| {impl['balancedness_mean']:.4f} / {impl['balancedness_min']:.4f} "
            f"| {impl['duplicate_rows']} / {impl['gpu_rows']} |"
        )


if __name__ == "__main__":
    main()
