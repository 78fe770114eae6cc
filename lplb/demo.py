"""The workflow demo: collect -> generate -> move -> balance on a simulated MoE workload.

Run it with ``make demo`` or ``python -m lplb.demo`` (``--help`` lists the flags). It lives in
``lplb`` because it drives both floors of the package -- ``eplb``'s collector, map generator,
move planner and rebalance manager, and ``lplb``'s Planner -- and ``eplb`` must never import
``lplb``. Steps (docs/workflow.md explains each, docs/concepts.md the strategies):

1. collect token statistics with ``eplb.TokenCollector`` and ``flush`` them to
   ``token_collects_all.json``;
2. generate an expert map with ``eplb generate-map`` (balanced policy) and plan the weight move
   to it (``eplb.plan_moves`` against the ``eplb.min_move_bytes`` bound);
3. run many batches while ``eplb.RebalanceManager`` watches the drifting load (rebalancing when
   the placement has degraded; the move is simulated as instantaneous) and the LPLB
   ``Planner`` splits every batch (CUDA kernels on a GPU, else the CPU backend), comparing five
   strategies per batch.

Writes ``report.json`` and PNG plots into the output folder it prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import eplb
from eplb import cli as eplb_cli
from eplb.fileio import atomic_write_text
from eplb.manager import round_robin_phy2log
from lplb import _C, oracle
from lplb.demo_workload import DriftingRouting
from lplb.planner import Planner
from lplb.topology import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P

__all__ = ["STRATEGIES", "main", "parse_args", "run_demo"]

# One DeepSeek-V3 routed expert: gate, up and down projections of 7168 x 2048, bf16.
EXPERT_BYTES = 3 * 7168 * 2048 * 2
GIB = 1 << 30

TOPOLOGIES = {"cube": CUBE_8P2E, "hypercube": HYPERCUBE_16P2E, "ring": RING_8P}

# (key, label, definition); the keys are those of report.json's "strategies".
STRATEGIES = (
    ("none", "no balancing", "identity placement: expert e on rank e // (E / ranks), no copies"),
    (
        "eplb",
        "EPLB only",
        "the RebalanceManager's placement (the generated map, then its rebalances), with "
        "replicas; an expert's tokens split evenly among its copies",
    ),
    (
        "lplb",
        "LPLB only",
        "Planner with the identity-order layout (no history): redundant slots copy each rank's "
        "first experts along the topology; LP split of every batch",
    ),
    (
        "eplb+lplb",
        "EPLB + LPLB",
        "Planner laid out from the load history (update_redundancy_mapping: experts packed by "
        "EPLB, each rank's heaviest replicated), re-laid out at every manager rebalance; LP "
        "split of every batch",
    ),
    (
        "optimum_lplb",
        "LP optimum, LPLB layout",
        "exact per-batch optimum (HiGHS) of the LP on the LPLB-only layout",
    ),
    (
        "optimum_eplb+lplb",
        "LP optimum, EPLB+LPLB layout",
        "exact per-batch optimum (HiGHS) of the LP on the EPLB + LPLB layout",
    ),
)


# ------------------------------------------------------------------------------- arguments


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's flags (``python -m lplb.demo --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lplb.demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--ranks", type=eplb_cli.positive_arg, default=32, help="expert-parallel ranks (GPUs)")
    add(
        "--experts",
        type=eplb_cli.positive_arg,
        default=256,
        help="logical experts of the MoE layer",
    )
    add("--topk", type=eplb_cli.positive_arg, default=8, help="experts per token")
    add(
        "--tokens", type=eplb_cli.positive_arg, default=4096, help="tokens per batch (per EP group)"
    )
    add("--batches", type=eplb_cli.positive_arg, default=150, help="batches of step 3")
    add(
        "--collect-batches",
        type=eplb_cli.positive_arg,
        default=20,
        help="batches collected in step 1",
    )
    add(
        "--redundant",
        type=eplb_cli.positive_arg,
        default=2,
        help="redundant slots per rank (EPLB replicas and LPLB copies alike)",
    )
    add("--topology", choices=sorted(TOPOLOGIES), default="cube", help="LPLB topology")
    add("--sigma", type=_non_negative, default=0.6, help="std. dev. of the log-popularity")
    add("--drift", type=_non_negative, default=0.003, help="per-batch drift of the popularity")
    add("--batch-noise", type=_non_negative, default=0.2, help="per-batch log-popularity noise")
    add(
        "--interval",
        type=eplb_cli.positive_arg,
        default=20,
        help="batches between manager decisions",
    )
    add(
        "--threshold",
        type=float,
        default=0.9,
        help="the manager rebalances when its placement's balancedness falls below this",
    )
    add("--seed", type=int, default=0, help="seed of the simulated routing")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where LPLB runs")
    add(
        "--threads",
        type=eplb_cli.positive_arg,
        default=1,
        help="torch CPU threads (the CPU backend's ops are small: more threads mostly add "
        "synchronisation)",
    )
    add("--out", type=Path, default=None, help="output folder (default: new under ./demo_out)")
    add("--no-plots", action="store_true", help="write no PNGs")
    add("--quiet", action="store_true", help="print only the output folder")
    args = parser.parse_args(argv)
    topology = TOPOLOGIES[args.topology]
    group_size, n_sets = topology.shape
    problems = []
    if args.ranks % group_size:
        problems.append(f"--ranks {args.ranks} is not a multiple of the topology's {group_size}")
    if args.experts % args.ranks:
        problems.append(f"--experts {args.experts} is not a multiple of --ranks {args.ranks}")
    elif args.redundant > args.experts // args.ranks:
        problems.append(
            f"--redundant {args.redundant} exceeds the {args.experts // args.ranks} experts "
            "per rank"
        )
    if args.redundant % n_sets:
        problems.append(
            f"--redundant must be a multiple of {n_sets} for --topology {args.topology}"
        )
    if args.topk > args.experts:
        problems.append(f"--topk {args.topk} exceeds --experts {args.experts}")
    if args.drift > 1.0:
        problems.append(f"--drift must be at most 1, got {args.drift}")
    if not 0.0 < args.threshold <= 1.0:
        problems.append(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.device == "cuda" and not (torch.cuda.is_available() and _C.has_cuda):
        problems.append("--device cuda needs a CUDA GPU and the CUDA build of lplb._C")
    if problems:
        parser.error("; ".join(problems))
    return args


# ------------------------------------------------------------------------------- output


class Console:
    """Prints unless quiet; lines printed while a progress bar runs go through ``tqdm.write``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            tqdm.write(text)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=self.quiet)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: the first and last columns (text) left-aligned, numbers right-aligned."""
    cells = [list(map(str, headers)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    text = {0, len(headers) - 1}

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i in text else c.rjust(w) for i, (c, w) in pairs).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _new_out_dir(out: Path | None) -> Path:
    """``out``, or a new timestamped folder under ./demo_out (created)."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("demo_out") / stamp
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{stamp}-{n}")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


# ------------------------------------------------------------------------------- simulation


def rank_loads(slots: torch.Tensor, slots_per_rank: int, ranks: int) -> torch.Tensor:
    """[ranks] float64 tokens per rank of the slot ids ``slots`` (any shape; -1 skipped)."""
    flat = slots.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat // slots_per_rank, minlength=ranks).to("cpu", torch.float64)


@dataclass
class Series:
    """Per-batch results of one strategy."""

    max_over_mean: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float | None]:
        values = np.asarray(self.max_over_mean)
        return {
            "mean": float(values.mean()),
            "p99": float(np.quantile(values, 0.99)),
            "max": float(values.max()),
            "ms_per_call": float(np.mean(self.seconds) * 1e3) if self.seconds else None,
        }


class Timer:
    """Host wall time of a call, waiting for the GPU when the work runs there."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """``(fn(*args), seconds)``."""
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in ("scipy", "matplotlib"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "missing"
    return versions


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [x for x in cpuinfo.read_text().splitlines() if x.startswith("model name")]
        name = models[0].split(":", 1)[1].strip() if models else name
    threads = torch.get_num_threads()
    return f"CPU: {name} ({os.cpu_count()} cores, torch on {threads} thread{'s' * (threads > 1)})"


def step_collect(
    args: argparse.Namespace, routing: DriftingRouting, out: Path, say: Console
) -> tuple[Path, torch.Tensor]:
    """Step 1: record ``--collect-batches`` batches with a TokenCollector; flush the JSON."""
    say(f"[1/3] collect token statistics: {args.collect_batches} batches with eplb.TokenCollector")
    collector = eplb.TokenCollector(num_layers=1, num_experts=args.experts, device="cpu")
    with say.bar(args.collect_batches, "collect") as bar:
        for _ in range(args.collect_batches):
            routing.advance()
            collector.record(0, routing.batch())
            bar.update()
    path = collector.flush(out)
    counts = collector.counts()[0]
    ratio = float(counts.max() / counts.double().mean())
    say(
        f"      wrote {path} ({int(counts.sum()):,} routed ids); hottest expert "
        f"{ratio:.2f}x the mean, coldest {float(counts.min() / counts.double().mean()):.2f}x"
    )
    return path, counts


def step_generate(args: argparse.Namespace, out: Path, say: Console) -> dict[str, Any]:
    """Step 2: ``eplb generate-map`` on the collected statistics, and the move plan to it."""
    num_replicas = args.experts + args.redundant * args.ranks
    map_path = out / "expert_map.json"
    argv = [
        "generate-map",
        "--json_folder",
        str(out),
        "--num_replicas",
        str(num_replicas),
        "--num_groups",
        "1",
        "--num_nodes",
        "1",
        "--num_gpus",
        str(args.ranks),
        "--output_path",
        str(map_path),
        "--policy",
        "balanced",
    ]
    say("[2/3] generate an expert map (balanced policy, all ranks in one node):")
    say(f"      $ eplb {' '.join(argv)}")
    sys.stdout.flush()
    code = eplb_cli.main([*(["-q"] if say.quiet else []), *argv])
    if code != 0:
        raise RuntimeError(f"eplb generate-map failed with exit code {code}")
    phy2log, _ = eplb.load_map(map_path)
    # Before statistics exist a deployment uses the round-robin placement (slot p holds expert
    # p mod E, where RebalanceManager starts too); the map replaces it.
    start = round_robin_phy2log(1, args.experts, num_replicas)
    plan = eplb.plan_moves(start, phy2log, args.ranks)[0]
    move_bytes = plan.bytes(EXPERT_BYTES)
    lower = eplb.min_move_bytes(start, phy2log, args.ranks, EXPERT_BYTES)
    busiest = max(len(r) for r in plan.recvs) * EXPERT_BYTES
    say(
        f"      weight move from the round-robin start (DeepSeek-V3 experts, "
        f"{EXPERT_BYTES / 2**20:.0f} MiB each): {plan.num_transfers} transfers, "
        f"{_gib(move_bytes)} per layer (lower bound {_gib(lower)}), busiest rank receives "
        f"{_gib(busiest)}; {sum(map(len, plan.copies))} local copies"
    )
    return {
        "map_file": str(map_path),
        "command": "eplb " + " ".join(argv),
        "num_replicas": num_replicas,
        "phy2log": phy2log,
        "move": {
            "from": "round robin (slot p holds expert p mod E)",
            "expert_bytes": EXPERT_BYTES,
            "transfers": plan.num_transfers,
            "local_copies": sum(map(len, plan.copies)),
            "bytes": move_bytes,
            "min_bytes": lower,
            "busiest_rank_bytes": busiest,
        },
    }


@dataclass
class RunState:
    """Everything step 3 records."""

    series: dict[str, Series]
    workloads: list[np.ndarray] = field(default_factory=list)
    layouts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    mean_load: list[float] = field(default_factory=list)
    rebalances: list[dict[str, Any]] = field(default_factory=list)
    snapshot: dict[str, Any] = field(default_factory=dict)
    solved_groups: int = 0


def step_run(
    args: argparse.Namespace,
    routing: DriftingRouting,
    history: torch.Tensor,
    generated: dict[str, Any],
    device: torch.device,
    say: Console,
) -> RunState:
    """Step 3: ``--batches`` batches under every strategy, the manager watching."""
    ranks, experts = args.ranks, args.experts
    num_replicas = generated["num_replicas"]
    topology = TOPOLOGIES[args.topology]
    backend = "CUDA kernels" if device.type == "cuda" else "CPU backend"
    say(
        f"[3/3] {args.batches} batches of {args.tokens} tokens x top-{args.topk}: "
        f"RebalanceManager every {args.interval} batches (threshold {args.threshold}), "
        f"LPLB Planner ({args.topology}, {backend} on {device}) on every batch"
    )
    manager = eplb.RebalanceManager(
        generated["phy2log"],
        num_replicas,
        1,
        1,
        ranks,
        policy="balanced",
        interval=args.interval,
        threshold=args.threshold,
        watchdog_seconds=None,
    )
    planners = {
        "lplb": Planner(topology, num_replicas, experts, ranks, num_nodes=1),
        "eplb+lplb": Planner(topology, num_replicas, experts, ranks, num_nodes=1),
    }
    planners["eplb+lplb"].update_redundancy_mapping(history)
    slots_per_rank = num_replicas // ranks
    state = RunState({key: Series() for key, _, _ in STRATEGIES})
    state.layouts = {key: [] for key in planners}
    avail = torch.zeros(1, dtype=torch.int64, device=device)
    timer = Timer(device)
    # One untimed call per Planner: the first call also pays one-off costs (op dispatch caches,
    # the CUDA fast path's launch plan).
    warm = routing.batch().to(device)
    for planner in planners.values():
        planner.run(warm, torch.zeros_like(avail))

    with say.bar(args.batches, "balance") as bar:
        for b in range(args.batches):
            routing.advance()
            idx = routing.batch()
            counts = torch.bincount(idx.reshape(-1), minlength=experts)
            mean = idx.numel() / ranks
            state.mean_load.append(mean)
            state.workloads.append(counts.numpy())
            loads = {"none": rank_loads(idx, experts // ranks, ranks)}
            loads["eplb"] = eplb.gpu_loads(counts[None].double(), manager.phy2log, ranks)[0]
            idx_dev = idx.to(device)
            for key, planner in planners.items():
                state.layouts[key].append(planner.phy2log.to("cpu", torch.int64))
                mapped, seconds = timer(planner.run, idx_dev, avail)
                state.series[key].seconds.append(seconds)
                loads[key] = rank_loads(mapped.long(), slots_per_rank, ranks)
            rebalance, seconds = timer(manager.step, counts[None])
            state.series["eplb"].seconds.append(seconds)
            state.series["eplb+lplb"].seconds[-1] += seconds
            for key, load in loads.items():
                state.series[key].max_over_mean.append(float(load.max()) / mean)
            if b == args.batches - 1:
                state.snapshot = {
                    "batch": b,
                    "mean": mean,
                    "rank_loads": {k: v.tolist() for k, v in loads.items()},
                }
            if rebalance is not None:
                _rebalance(args, b, rebalance, manager, planners["eplb+lplb"], state, say)
            bar.update()
    state.solved_groups = int(avail.item())
    return state


def _rebalance(
    args: argparse.Namespace,
    batch: int,
    rebalance: eplb.Rebalance,
    manager: eplb.RebalanceManager,
    planner: Planner,
    state: RunState,
    say: Console,
) -> None:
    """Carry out a manager's rebalance: plan the move (simulated as instantaneous), commit it,
    and lay the EPLB + LPLB Planner out again from the same tracked load."""
    plan = eplb.plan_moves(rebalance.old_phy2log, rebalance.new_phy2log, args.ranks)
    move_bytes = sum(p.bytes(EXPERT_BYTES) for p in plan)
    lower = eplb.min_move_bytes(
        rebalance.old_phy2log, rebalance.new_phy2log, args.ranks, EXPERT_BYTES
    )
    manager.commit(rebalance)
    old_layout = planner.phy2log.to("cpu", torch.int64)
    planner.update_redundancy_mapping(rebalance.load[0])
    new_layout = planner.phy2log.to("cpu", torch.int64)
    planner_bytes = eplb.plan_moves(old_layout, new_layout, args.ranks).bytes(EXPERT_BYTES)
    before = float(rebalance.balancedness_before.mean())
    after = float(rebalance.balancedness_after.mean())
    changed = int(rebalance.changed.sum())
    state.rebalances.append(
        {
            "batch": batch,
            "manager_step": rebalance.step,
            "balancedness_before": before,
            "balancedness_after": after,
            "changed_slots": changed,
            "eplb_move_bytes": move_bytes,
            "eplb_min_move_bytes": lower,
            "lplb_layout_move_bytes": planner_bytes,
        }
    )
    say(
        f"      batch {batch}: rebalance (tracked balancedness {before:.3f} -> {after:.3f}, "
        f"{changed} slots change, move {_gib(move_bytes)}, bound {_gib(lower)}); "
        f"EPLB+LPLB layout re-derived, move {_gib(planner_bytes)}"
    )


def lp_optimum(
    args: argparse.Namespace, state: RunState
) -> dict[str, tuple[list[float], float]] | None:
    """Per batch and layout, the exact LP optimum's max rank load / mean (HiGHS via scipy).

    Returns ``{strategy key: (max/mean per batch, seconds per batch)}``, or None without scipy.
    """
    try:
        import scipy  # noqa: F401
    except ImportError:
        return None
    topology = TOPOLOGIES[args.topology]
    num_replicas = args.experts + args.redundant * args.ranks
    # Only the layout sizes of this Planner are used (oracle.stacked_loads).
    planner = Planner(topology, num_replicas, args.experts, args.ranks, num_nodes=1)
    workloads = np.stack(state.workloads)
    mean = np.asarray(state.mean_load)
    results = {}
    for key in ("lplb", "eplb+lplb"):
        start = time.perf_counter()
        w, f = oracle.stacked_loads(planner, workloads, state.layouts[key])
        best = oracle.optimal_max_load(w, f, topology.numpy()).reshape(len(mean), -1).max(1)
        seconds = (time.perf_counter() - start) / len(mean)
        results[f"optimum_{key}"] = ((best / mean).tolist(), seconds)
    return results


# ------------------------------------------------------------------------------- main


def _summaries(state: RunState) -> dict[str, dict[str, Any]]:
    """Per strategy with results: label, definition, mean/p99/max of max/mean, ms per call."""
    strategies = {}
    for key, label, definition in STRATEGIES:
        series = state.series[key]
        if series.max_over_mean:
            strategies[key] = {
                "label": label,
                "definition": definition,
                **series.stats(),
                "max_over_mean_per_batch": series.max_over_mean,
            }
    return strategies


def _print_summary(
    args: argparse.Namespace,
    strategies: dict[str, dict[str, Any]],
    device: torch.device,
    say: Console,
) -> None:
    """The strategies' definitions and the results table."""
    timed = {
        "none": "-",
        "eplb": "RebalanceManager.step",
        "lplb": f"Planner.run ({device.type})",
        "eplb+lplb": f"Planner.run ({device.type}) + RebalanceManager.step",
        "optimum_lplb": "HiGHS, per batch",
        "optimum_eplb+lplb": "HiGHS, per batch",
    }
    say()
    say("Strategies (same batches, same slot budget of experts + redundant slots per rank):")
    for s in strategies.values():
        indent = f"  {s['label']:<29} "
        say(textwrap.fill(s["definition"], 100, initial_indent=indent, subsequent_indent=" " * 32))
    say()
    say(f"max rank load / mean rank load over {args.batches} batches (1.000 is perfect):")
    rows = [
        [
            s["label"],
            f"{s['mean']:.3f}",
            f"{s['p99']:.3f}",
            "-" if s["ms_per_call"] is None else f"{s['ms_per_call']:.3f}",
            timed[key],
        ]
        for key, s in strategies.items()
    ]
    say(_table(["strategy", "mean", "p99", "ms/call", "timed call"], rows))


def run_demo(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three steps with parsed ``args`` (``argv``: the flags, for the report); returns
    the report, also written as ``report.json`` into the output folder."""
    wall = time.perf_counter()
    say = Console(args.quiet)
    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and _C.has_cuda
    on_gpu = args.device == "cuda" or (args.device == "auto" and use_cuda)
    device = torch.device("cuda" if on_gpu else "cpu")
    out = _new_out_dir(args.out)
    say(f"output folder: {out}")
    say(
        f"MoE layer: {args.experts} experts, top-{args.topk}, {args.ranks} EP ranks, "
        f"{args.redundant} redundant slots per rank; log-normal popularity (sigma {args.sigma}), "
        f"drift {args.drift}/batch, batch noise {args.batch_noise}; seed {args.seed}"
    )
    routing = DriftingRouting(
        args.experts,
        args.topk,
        args.tokens,
        sigma=args.sigma,
        drift=args.drift,
        batch_noise=args.batch_noise,
        seed=args.seed,
    )
    stats_path, history = step_collect(args, routing, out, say)
    generated = step_generate(args, out, say)
    state = step_run(args, routing, history, generated, device, say)
    optimum = lp_optimum(args, state)
    if optimum is None:
        say("      scipy is missing: the LP optimum rows are skipped (pip install scipy)")
    else:
        for key, (values, seconds) in optimum.items():
            state.series[key].max_over_mean = values
            state.series[key].seconds = [seconds] * len(values)

    strategies = _summaries(state)
    _print_summary(args, strategies, device, say)
    n_group = args.ranks // TOPOLOGIES[args.topology].shape[0]
    total = 2 * n_group * args.batches  # two Planners
    say(
        f"LP solves that converged: {state.solved_groups} of {total} (2 Planners x {n_group} "
        f"groups x {args.batches} batches)"
    )
    moved = {
        key: sum(r[name] for r in state.rebalances)
        for key, name in (("eplb", "eplb_move_bytes"), ("eplb+lplb", "lplb_layout_move_bytes"))
    }
    say(
        f"{len(state.rebalances)} rebalances moved {_gib(moved['eplb'])} of expert weights for "
        f"EPLB and {_gib(moved['eplb+lplb'])} for the EPLB + LPLB layout (one layer, "
        f"{EXPERT_BYTES / 2**20:.0f} MiB experts)"
    )

    flags = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "command": " ".join(["python -m lplb.demo", *flags]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": _device_name(device),
        "lplb_backend": device.type,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "out_dir": str(out),
        "collect": {"file": str(stats_path), "routed_ids": int(history.sum())},
        "generate": {k: v for k, v in generated.items() if k != "phy2log"},
        "rebalances": state.rebalances,
        "rebalance_move_bytes": moved,
        "lp_groups_converged": state.solved_groups,
        "lp_groups_total": total,
        "strategies": strategies,
        "snapshot": state.snapshot,
        "mean_rank_load_per_batch": state.mean_load,
        "plots": [],
    }
    if args.no_plots:
        say("plots: skipped (--no-plots)")
    else:
        from lplb import demo_plots

        try:
            report["plots"] = [str(p) for p in demo_plots.plot_report(report, out)]
        except ImportError:
            say("plots: matplotlib is missing, PNGs skipped (pip install matplotlib)")
        else:
            for path in report["plots"]:
                say(f"wrote {path}")
    report["seconds"] = time.perf_counter() - wall
    report_path = atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    say(f"wrote {report_path} ({report['seconds']:.1f} s)")
    if args.quiet:
        print(out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lplb.demo``; returns the exit code."""
    run_demo(parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
