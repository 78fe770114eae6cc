"""Benchmark the workload exchange of a Planner with a process group, one process per GPU.

Per-call latency, on every rank, of (a) the exchange alone, (b) exchange + solve
(``Planner.solve_probs``) and (c) the whole ``Planner.run``, for the NCCL all-reduce eagerly and
in a CUDA graph and for the device-side NVSHMEM exchange eagerly and in a CUDA graph (when lplb
was built with LPLB_NVSHMEM=1), next to the solve without any exchange (a Planner without a
group). Setup: E = 256 logical experts, 2 redundant slots per rank, ring(2) on 2 GPUs and
torus_2d(2,2) on 4, idx [16384, 8] int64 (top-8 of skewed random router scores) per rank.

Methods: eager = wall clock of ``fn(); torch.cuda.synchronize()`` per call (bench_lplb.py's
eager_times: median of 200 calls after 50 warm-up calls); graph = CUDA events around replays of
a graph holding --calls calls back to back, per call, median of --replays replays. Every rank
measures itself; the record keeps each rank's median and their maximum (the slowest rank sets
the pace of a collective).

The JSON record (device, versions, command, numbers) goes to --out (default
bench/results/exchange_<n>gpu_<gpu>.json). NVLink multicast stays off (NCCL_NVLS_ENABLE=0,
NVSHMEM_DISABLE_NVLS=1, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

Usage: python bench/bench_exchange.py --gpus 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_lplb import eager_times, gpu_tag, graph_times, topk_idx, versions

from eplb.fileio import atomic_write_text
from lplb import Planner, comm, ring, torus_2d

N_LOGICAL = 256
ROWS = 16384
TOPOLOGIES = {2: ("ring(2)", ring(2)), 4: ("torus_2d(2,2)", torus_2d(2, 2))}
NVSHMEM_TARGET_US = 5.0  # issue 13: the NVSHMEM exchange adds at most this much to the solve
# NVLink multicast stays off; set before any process creates a communicator.
NVLS_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
# One host: NVSHMEM reaches every peer over NVLink, so no remote transport is initialised.
SINGLE_HOST_ENV = {"NVSHMEM_REMOTE_TRANSPORT": "none"}


def _measure(planner: Planner, idx: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Exchange, exchange + solve and run of one Planner, eagerly and in a graph, in us."""
    device = idx.device
    n_sms = torch.cuda.get_device_properties(device).multi_processor_count
    workload, _ = planner.count_workload(idx, n_sms)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    fns: dict[str, Callable[[], object]] = {
        "exchange_solve": lambda: planner.solve_probs(workload, counter),
        "run": lambda: planner.run(idx, counter),
    }
    if planner._exchange is not None:
        fns["exchange"] = lambda: planner._exchange(workload)
    out: dict[str, float] = {}
    for name, fn in fns.items():
        dist.barrier()
        out[f"{name}_eager_us"] = eager_times(fn)["median_us"]
        # Every rank replays the same collectives: capture thread-local, start timing together.
        out[f"{name}_graph_us"] = graph_times(
            fn,
            args.calls,
            args.replays,
            capture_error_mode="thread_local",
            before_timing=dist.barrier,
        )["median_us"]
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    for key, value in SINGLE_HOST_ENV.items():
        os.environ.setdefault(key, value)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        device_id=device,
    )
    try:
        _, r2o = TOPOLOGIES[world]
        idx = topk_idx(ROWS, seed=100 + rank)
        size = (r2o, N_LOGICAL + 2 * world, N_LOGICAL)
        results = {"no exchange": _measure(Planner(*size, ep_size=world), idx, args)}
        results["nccl"] = _measure(Planner(*size, group=dist.group.WORLD), idx, args)
        if comm.nvshmem_available():
            planner = Planner(*size, group=dist.group.WORLD)
            planner.init_nvshmem()
            results["nvshmem"] = _measure(planner, idx, args)
            # The protocol for peers behind a network, forced here for comparison.
            planner._exchange = comm.NvshmemExchange(
                dist.group.WORLD, N_LOGICAL, protocol="put_signal"
            )
            results["nvshmem put_signal"] = _measure(planner, idx, args)
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, Path(out) / "results.pt")
        torch.cuda.synchronize()
        dist.barrier()
        comm.finalize_nvshmem()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _summarise(per_rank: list[dict]) -> dict[str, dict[str, object]]:
    """{exchange: {metric: {"per_rank": [...], "max_us": slowest rank}}}."""
    out: dict[str, dict[str, object]] = {}
    for exchange in per_rank[0]:
        out[exchange] = {
            metric: {
                "per_rank_us": [round(r[exchange][metric], 2) for r in per_rank],
                "max_us": round(max(r[exchange][metric] for r in per_rank), 2),
            }
            for metric in per_rank[0][exchange]
        }
    return out


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _nvshmem_versions() -> dict[str, str]:
    try:
        module = comm._module()
    except ImportError as err:
        return {"nvshmem": f"not built ({err})"}
    return {"nvshmem_build": module.build_version, "nvshmem_runtime": module.runtime_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=20, help="calls per graph")
    parser.add_argument("--replays", type=int, default=100, help="timed graph replays")
    args = parser.parse_args()
    os.environ.update(NVLS_OFF)  # inherited by the spawned ranks
    world = args.gpus or torch.cuda.device_count()
    if world not in TOPOLOGIES or torch.cuda.device_count() < world:
        raise SystemExit(
            f"bench_exchange.py runs on 2 or 4 GPUs ({torch.cuda.device_count()} visible, "
            f"--gpus {args.gpus})"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), args, tmp), nprocs=world, join=True)
        per_rank = torch.load(Path(tmp) / "results.pt")
    results = _summarise(per_rank)
    solve = results["no exchange"]["exchange_solve_graph_us"]["max_us"]
    record: dict[str, object] = {
        **versions(),
        "nccl": _nccl_version(),
        **_nvshmem_versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "gpus": world,
        "setup": (
            f"{TOPOLOGIES[world][0]}, E = {N_LOGICAL}, 2 redundant slots per rank, idx "
            f"[{ROWS}, 8] int64 per rank; 'no exchange' = a Planner without a group"
        ),
        "method": {
            "eager": "wall clock of fn(); torch.cuda.synchronize() per call, median of 200 "
            "after 50 warm-up calls (bench_lplb.eager_times)",
            "graph": f"CUDA events around replays of a graph of {args.calls} calls, per call, "
            f"median of {args.replays} replays after 10",
            "ranks": "each rank measures itself; max_us = the slowest rank",
        },
        "results": results,
    }
    if "nvshmem" in results:
        added = results["nvshmem"]["exchange_solve_graph_us"]["max_us"] - solve
        record["nvshmem_adds_to_solve_graph_us"] = round(added, 2)
        record["target_us"] = NVSHMEM_TARGET_US
        record["target_met"] = added <= NVSHMEM_TARGET_US
    record["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or Path("bench/results") / (
        f"exchange_{world}gpu_{gpu_tag(str(record['device']))}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    for exchange, metrics in results.items():
        row = "  ".join(f"{m.removesuffix('_us')} {v['max_us']:.1f}" for m, v in metrics.items())
        print(f"{exchange:18s} {row}  (us, slowest rank)")
    if "nvshmem_adds_to_solve_graph_us" in record:
        print(
            f"NVSHMEM exchange adds {record['nvshmem_adds_to_solve_graph_us']} us to the solve "
            f"in a graph (target <= {NVSHMEM_TARGET_US} us: "
            f"{'met' if record['target_met'] else 'MISSED'})"
        )
    print(f"wrote {out} in {record['seconds']} s")


if __name__ == "__main__":
    main()
