"""Benchmark expert-weight moves: eplb.move_experts (stop-the-world) and eplb.ExpertMover (async).

One process per GPU of this host, NCCL. DeepSeek-V3-sized experts (three 7168x2048 bf16
matrices, 88 MB each), 32 slots per rank, and a realistic rebalance: loads drift and
``rebalance_experts(policy="balanced", old_phy2log=old)`` picks the new placement (the layer
whose share of changed slots is nearest 20 % is timed). Reports

* bytes moved against the lower bound (``min_move_bytes``);
* the synchronous move's time (slowest rank, median of repeats after warm-up) and GB/s per rank
  -- with the default transport (peer staging on one host: the row-copy kernel, and without it
  copy engines) and over the group (``transport="group"``: NCCL) -- against the GPU-to-GPU
  bandwidth measured in the same run two ways (``batch_isend_irecv`` of the same bytes to the
  next rank, ring-wise, and a copy-engine copy of them into the next rank's symmetric memory)
  and a device-to-device copy (the commit's cost); the same move with a gloo control group; and,
  with ``profile=True`` (device drained after each phase), the time of each phase (check, stage,
  post, transfer, agree, commit) per rank;
* a bf16 matmul loop (the model's compute) alone, with the async mover moving layers
  continuously in the background -- with the default (peer staging on one host), over the
  group with NCCL at 4 CTAs, and once per other ``max_ctas`` of ``--ctas`` (the transfers'
  NCCL CTAs), with the achieved
  transfer bandwidth and the host time of ``step()`` -- and with the same number of layers
  moved synchronously. Each configuration runs ``--loops`` loops, each right after a loop
  without the mover; the record keeps every pair and reports the pair with the median
  slow-down. The loop waits for each forward on the compute stream, as a serving loop waits
  for its output; the default configuration is also run with a device-wide
  synchronisation per forward (the method of the first recorded runs, which also waits for the
  background transfers).

The JSON record (device, versions, command, numbers) goes to
``bench/results/moves_<n>gpu_<device>.json`` (written after each part, so a failure keeps
what was measured). NVLink multicast stays off: NCCL_NVLS_ENABLE=0, NVSHMEM_DISABLE_NVLS=1 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set here when unset (the record says which).

    python bench/bench_moves.py [--gpus N] [--ctas none,1,2,4,8] [--parts sync,async]
    python bench/bench_moves.py --cpu --small       # smoke test: gloo, CPU, tiny experts
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb
from eplb import move_exec, row_copy
from eplb.fileio import atomic_write_text
from eplb.move_async import DEFAULT_MAX_CTAS
from eplb.move_exec import PHASES, comm_of, exchange, expert_bytes
from eplb.move_peer import PeerStaging

ROOT = Path(__file__).resolve().parents[1]
# NCCL reads these when a communicator is made: main() sets them before the workers start.
NVLS_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
# (matrices per expert, rows, cols, slots per rank, matmul size) for real and --small runs
REAL = {"mats": 3, "rows": 2048, "cols": 7168, "slots": 32, "mm": 8192}
SMALL = {"mats": 3, "rows": 16, "cols": 64, "slots": 8, "mm": 128}
LAYERS = 4  # layers held for the async part
DRIFTS = (0.1, 0.2, 0.3, 0.5, 0.8)
TARGET_SHARE = 0.2  # share of changed slots of the timed layer
MATMULS_PER_FORWARD = 4
# Issue targets: sync move within 1.2x of bytes / measured P2P bandwidth; async mover adds
# under 10 % to a concurrent compute loop.
TARGETS = {"move_vs_ideal": 1.2, "async_slowdown": 0.10}


def placements(world: int, slots: int) -> dict:
    """Old placement from log-normal loads, new one after a load drift (same on every rank)."""
    total = world * slots
    experts = total * 7 // 8  # 1/8 of the slots hold redundant copies
    gen = torch.Generator().manual_seed(0)
    load = torch.exp(torch.randn(LAYERS, experts, generator=gen))
    old = eplb.rebalance_experts(load, total, 1, 1, world, policy="balanced")[0]
    best = None
    for drift in DRIFTS:
        drifted = load * torch.exp(drift * torch.randn(LAYERS, experts, generator=gen))
        new, _, _, changed = eplb.rebalance_experts(
            drifted, total, 1, 1, world, policy="balanced", old_phy2log=old
        )
        share = changed.double() / total
        score = float((share.mean() - TARGET_SHARE).abs())
        if best is None or score < best[0]:
            best = (score, drift, new, share)
    _, drift, new, share = best
    layer = int((share - TARGET_SHARE).abs().argmin())
    return {
        "num_logical": experts,
        "drift_sigma": drift,
        "old": old,
        "new": new,
        "changed_share": share.tolist(),
        "sync_layer": layer,
    }


def fill(weights: list[torch.Tensor], placement: torch.Tensor, rank: int) -> None:
    """Slot s of this rank holds the constant ``expert id`` (exact in bf16 below 256)."""
    slots = weights[0].shape[0]
    values = placement[rank * slots : (rank + 1) * slots].to(weights[0].dtype)
    for w in weights:
        w.copy_(values.to(w.device).view(-1, *([1] * (w.dim() - 1))).expand_as(w))


def layer_weights(size: dict, place: dict, rank: int, device: torch.device) -> list:
    """LAYERS lists of ``size["mats"]`` bf16 tensors ``[slots, rows, cols]``, filled as this
    rank's slots of the old placement."""
    weights = [
        [
            torch.empty(
                size["slots"], size["rows"], size["cols"], dtype=torch.bfloat16, device=device
            )
            for _ in range(size["mats"])
        ]
        for _ in range(LAYERS)
    ]
    for layer in range(LAYERS):
        fill(weights[layer], place["old"][layer], rank)
    return weights


def holds(weights: list[torch.Tensor], placement: torch.Tensor, rank: int) -> bool:
    """Whether every slot holds exactly its expert's constant."""
    slots = weights[0].shape[0]
    want = placement[rank * slots : (rank + 1) * slots].to(torch.float32)
    for w in weights:
        low, high = w.view(slots, -1).float().aminmax(dim=1)
        if not (torch.equal(low.cpu(), want) and torch.equal(high.cpu(), want)):
            return False
    return True


class Clock:
    """Wall time with the device drained first (CUDA) -- a move's stall as the host sees it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def slowest(seconds: float, device: torch.device) -> float:
    """The maximum of ``seconds`` over the ranks."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn: Callable[[], object], clock: Clock, device, warmup: int, repeats: int) -> float:
    """Median over ``repeats`` (after ``warmup``) of the slowest rank's seconds for ``fn()``."""
    samples = []
    for i in range(warmup + repeats):
        dist.barrier()
        start = clock.now()
        fn()
        elapsed = slowest(clock.now() - start, device)
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples)


def p2p_ring(nbytes: int, device: torch.device, rank: int, world: int) -> Callable[[], None]:
    """A batch_isend_irecv of ``nbytes`` to the next rank and from the previous one."""
    send = torch.ones(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def run() -> None:
        ops = [
            dist.P2POp(dist.isend, send, (rank + 1) % world),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return run


def peer_ring(nbytes: int, device: torch.device, rank: int, world: int) -> Callable[[], None]:
    """A copy-engine copy of ``nbytes`` into the next rank's symmetric memory (collective to
    make: a rendezvous)."""
    pool = PeerStaging(dist.group.WORLD, device)
    pool.reserve(nbytes)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)

    def run() -> None:
        pool.remote((rank + 1) % world, 0, nbytes).copy_(src)  # the pool stays alive with run

    return run


def exchange_seconds(device: torch.device, repeats: int = 50) -> float:
    """Median host seconds of one small exchange of move_experts (check or agreement) on the
    default group, the ranks started together."""
    comm = comm_of(None, device)
    samples = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        exchange(comm, [1], 60.0)
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def compute_loop(size: int, device: torch.device, dtype: torch.dtype):
    """A model's compute stand-in: one 'forward' = MATMULS_PER_FORWARD square matmuls."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty_like(a)

    def forward() -> None:
        for _ in range(MATMULS_PER_FORWARD):
            torch.matmul(a, b, out=out)

    return forward


def gathered(value: object) -> list:
    """``value`` of every rank, in rank order (a collective)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def stream_wait(device: torch.device) -> Callable[[], None]:
    """Waits for the work queued on the current stream (not for other streams' work)."""
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.current_stream(device).synchronize()


def bench_sync(ctx: dict, result: dict) -> dict:
    rank, world, device, clock = ctx["rank"], ctx["world"], ctx["device"], ctx["clock"]
    place, weights = ctx["place"], ctx["weights"]
    layer = place["sync_layer"]
    old, new = place["old"][layer], place["new"][layer]
    w = weights[layer]
    row = expert_bytes(w)
    start = time.perf_counter()
    plans = eplb.plan_moves(place["old"], place["new"], world)
    plan_seconds = time.perf_counter() - start
    plan, back = plans[layer], eplb.plan_moves(new, old, world)
    received = [len(r) * row for r in plan.recvs]
    sent = [len(s) * row for s in plan.sends]

    def there_and_back() -> None:
        eplb.move_experts(w, old, new, plan=plan, timeout=120.0)
        eplb.move_experts(w, new, old, plan=back, timeout=120.0)

    there_and_back()  # warm-up, then verify a full round trip
    eplb.move_experts(w, old, new, plan=plan, timeout=120.0)
    correct_after_move = holds(w, new, rank)
    eplb.move_experts(w, new, old, plan=back, timeout=120.0)
    correct_after_return = holds(w, old, rank)

    def samples_of(**options) -> tuple[list[float], list[dict]]:
        """Slowest-rank seconds of the move there (and this rank's phases), after warm-up."""
        samples, phases = [], []
        for i in range(ctx["warmup"] + ctx["repeats"]):
            dist.barrier()
            begin = clock.now()
            stats = eplb.move_experts(w, old, new, plan=plan, timeout=120.0, **options)
            elapsed = slowest(clock.now() - begin, device)
            eplb.move_experts(w, new, old, plan=back, timeout=120.0, **options)
            if i >= ctx["warmup"]:
                samples.append(elapsed)
                phases.append(stats.phases)
        return samples, phases

    group: dict = {}
    if device.type == "cuda":  # the same move over the group (NCCL), first, for comparison
        group["exchange_seconds_before_peer"] = exchange_seconds(device)
        group_samples, _ = samples_of(transport="group")
        _, group_profiled = samples_of(transport="group", profile=True)
        group.update(
            move_seconds_median=statistics.median(group_samples),
            phase_seconds_median_per_rank=gathered(
                {k: statistics.median(p.get(k, 0.0) for p in group_profiled) for k in PHASES}
            ),
        )
    samples, _ = samples_of()
    move_s = statistics.median(samples)
    copy_calls: dict = {}
    if device.type == "cuda" and row_copy.available():  # the same moves without the kernel
        before, move_exec.ROW_KERNEL = move_exec.ROW_KERNEL, False
        try:
            copy_samples, _ = samples_of()
        finally:
            move_exec.ROW_KERNEL = before
        copy_calls["move_seconds_median"] = statistics.median(copy_samples)
    gloo_samples, _ = samples_of(control_group=ctx["control"])
    profiled_samples, profiled = samples_of(profile=True)
    phase_medians = {k: statistics.median(p.get(k, 0.0) for p in profiled) for k in PHASES}
    if group:
        group["exchange_seconds_after_peer"] = exchange_seconds(device)

    ring_bytes = max(max(received), row)
    ring_s = timed(p2p_ring(ring_bytes, device, rank, world), clock, device, 2, ctx["repeats"])
    ce_s = None
    if device.type == "cuda":
        ce = peer_ring(ring_bytes, device, rank, world)
        ce_s = timed(ce, clock, device, 2, ctx["repeats"])
    src = torch.empty(ring_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), clock, device, 2, ctx["repeats"])
    p2p_gbps = ring_bytes / ring_s / 1e9
    ideal_s = max(received) / (p2p_gbps * 1e9)
    # A rank that sends more than any rank receives needs longer than ideal_s at that rate.
    ideal_either_s = max(max(received), max(sent)) / (p2p_gbps * 1e9)
    best_gbps = max(p2p_gbps, ring_bytes / ce_s / 1e9 if ce_s else 0.0)
    best_ideal_s = max(received) / (best_gbps * 1e9)
    if group:
        group["move_vs_ideal"] = group["move_seconds_median"] / ideal_s
    if copy_calls:
        copy_calls["move_vs_ideal"] = copy_calls["move_seconds_median"] / ideal_s
    return {
        "layer": layer,
        "changed_slots": sum(int(o != n) for o, n in zip(old.tolist(), new.tolist(), strict=True)),
        "slots": len(old),
        "expert_bytes": row,
        "bytes_moved": plan.bytes(row),
        "bytes_lower_bound": eplb.min_move_bytes(old, new, world, row),
        "bytes_received_per_rank": received,
        "bytes_sent_per_rank": sent,
        "messages_sent_per_rank": [len({d for d, _ in s}) for s in plan.sends],
        "messages_received_per_rank": [len({r for r, _, _ in v}) for v in plan.recvs],
        "local_copies_per_rank": [len(c) for c in plan.copies],
        "plan_seconds_all_layers": plan_seconds,
        "move_seconds_median": move_s,
        "move_seconds_samples": samples,
        "move_gbps_per_rank": max(received) / move_s / 1e9,
        "move_seconds_gloo_control_median": statistics.median(gloo_samples),
        "move_seconds_profiled_median": statistics.median(profiled_samples),
        "phase_seconds_median_per_rank": gathered(phase_medians),
        "p2p_ring_bytes": ring_bytes,
        "p2p_ring_seconds": ring_s,
        "p2p_gbps_per_rank": p2p_gbps,
        "ideal_seconds": ideal_s,
        "move_vs_ideal": move_s / ideal_s if ideal_s > 0 else None,
        "ideal_seconds_max_sent_or_received": ideal_either_s,
        "move_vs_ideal_max_sent_or_received": move_s / ideal_either_s if ideal_either_s else None,
        "p2p_copy_engine_seconds": ce_s,
        "p2p_copy_engine_gbps_per_rank": ring_bytes / ce_s / 1e9 if ce_s else None,
        "ideal_seconds_best_p2p": best_ideal_s,
        "move_vs_ideal_best_p2p": move_s / best_ideal_s if best_ideal_s > 0 else None,
        "transport_group": group,
        "without_row_kernel": copy_calls,
        "d2d_copy_seconds_same_bytes": copy_s,
        "correct_after_move": correct_after_move,
        "correct_after_return": correct_after_return,
    }


class Shuttle:
    """Keeps an ExpertMover busy: moves every layer to the other placement, then back, ...

    ``state["at"]`` ("old" or "new") is where all layers are between moves; it is shared by
    the movers of one run, which take turns on the same weights.
    """

    def __init__(self, mover: eplb.ExpertMover, place: dict, state: dict) -> None:
        self.mover, self.place, self.state = mover, place, state
        self.layers = 0  # layers committed by step() calls (the timed loop's count)
        self.starts = 0
        self.received = self.sent = 0  # this rank's bytes over every finished move
        self.phases: dict[str, float] = {}
        self.step_seconds = 0.0  # host time inside step()

    def _target(self) -> str:
        return "new" if self.state["at"] == "old" else "old"

    def start(self) -> None:
        self.mover.start(self.place[self.state["at"]], self.place[self._target()])
        self.starts += 1

    def _finished(self) -> None:
        stats = self.mover.stats
        self.received += stats.bytes_received
        self.sent += stats.bytes_sent
        for key, value in stats.phases.items():
            self.phases[key] = self.phases.get(key, 0.0) + value
        self.state["at"] = self._target()

    def step(self, i: int = 0) -> None:
        begin = time.perf_counter()
        self.layers += len(self.mover.step())
        if self.mover.done:
            self._finished()
            self.start()
        self.step_seconds += time.perf_counter() - begin

    def finish(self) -> None:
        """Complete the move in progress (outside the timed loop)."""
        while not self.mover.done:
            self.mover.step()
        self._finished()


def bench_async(ctx: dict, result: dict) -> dict:
    """The compute loop alone, with the async mover (the defaults first, then over the group per
    max_ctas), and with synchronous moves; ``result`` gets each configuration as soon as it is
    measured."""
    rank, device, clock = ctx["rank"], ctx["device"], ctx["clock"]
    place, weights = ctx["place"], ctx["weights"]
    forward = compute_loop(ctx["size"]["mm"], device, ctx["compute_dtype"])
    forwards = ctx["forwards"]
    wait_stream = stream_wait(device)
    for _ in range(3):
        forward()

    def loop(between: Callable[[int], None], device_sync: bool = False) -> float:
        # Like a serving or training loop, the host waits for each forward (sampling, loss)
        # before the next -- on the compute stream; step() / move_experts() run in that gap.
        wait = clock.now if device_sync else wait_stream
        clock.now()
        dist.barrier()
        begin = time.perf_counter()
        for i in range(forwards):
            forward()
            wait()
            between(i)
        wait()
        return slowest(time.perf_counter() - begin, device)

    base = [loop(lambda i: None) for _ in range(2)]
    base_s = min(base)
    state = {"at": "old"}
    configs: list[dict] = []
    result.update(compute_alone_seconds=base, default_max_ctas=DEFAULT_MAX_CTAS, configs=configs)
    # The default first ("auto": peer staging on this host), then over the group with NCCL at
    # DEFAULT_MAX_CTAS and at the other max_ctas.
    order = [("auto", None), ("group", DEFAULT_MAX_CTAS)] + [
        ("group", c) for c in ctx["ctas"] if c != DEFAULT_MAX_CTAS
    ]
    for transport, max_ctas in order:
        mover = eplb.ExpertMover(
            weights,
            ctx["group"],
            max_layers_in_flight=1,
            timeout=120.0,
            control_group=ctx["control"],
            max_ctas=max_ctas,
            transport=transport,
            profile=True,
        )
        shuttle = Shuttle(mover, place, state)
        shuttle.start()
        # Paired loops: each with the mover right after one without, so that a drift of the
        # machine (clocks, temperature) between configurations does not count.
        pairs = []
        for _ in range(ctx["loops"]):
            alone_s = loop(lambda i: None)
            before = shuttle.layers
            pairs.append((alone_s, loop(shuttle.step), shuttle.layers - before))
        slowdowns = [a / b - 1 for b, a, _ in pairs]
        pick = sorted(range(len(pairs)), key=lambda k: slowdowns[k])[len(pairs) // 2]
        alone_s, async_s, layers = pairs[pick]  # the pair with the median slow-down
        step_seconds = shuttle.step_seconds / len(pairs)
        device_sync_s = None
        if not configs:  # the headline configuration: also the first recorded runs' method
            before = shuttle.layers
            device_sync_s = loop(shuttle.step, device_sync=True)
            device_sync_layers = shuttle.layers - before
        shuttle.finish()
        correct = all(holds(w, place[state["at"]][i], rank) for i, w in enumerate(weights))
        transfer = shuttle.phases.get("transfer_gpu", shuttle.phases.get("transfer", 0.0))
        nbytes = max(shuttle.received, shuttle.sent)
        bandwidth = nbytes / transfer / 1e9 if transfer > 0 else None
        config = {
            "transport": transport,
            "max_ctas": max_ctas,
            "transfer_config": mover.transfer_config,
            "loops": ctx["loops"],
            "paired_loop_seconds": [{"alone": b, "async": a, "layers": n} for b, a, n in pairs],
            "async_slowdowns": slowdowns,
            "async_loop_seconds": async_s,
            "async_slowdown": slowdowns[pick],
            "layers_moved": layers,
            "moves_started": shuttle.starts,
            "async_added_seconds_per_layer": (async_s - alone_s) / max(layers, 1),
            # max(bytes sent, bytes received) / time from posting to completion (GPU events)
            "transfer_gbps_per_rank": gathered(bandwidth),
            "step_host_seconds_per_rank": gathered(step_seconds),  # per loop, mean
            "mover_phase_seconds_per_rank": gathered(shuttle.phases),
            "correct": correct,
        }
        if device_sync_s is not None:
            config["async_device_sync_loop_seconds"] = device_sync_s
            config["async_device_sync_slowdown"] = device_sync_s / base_s - 1
            config["async_device_sync_layers_moved"] = device_sync_layers
        configs.append(config)

    default = configs[0]
    moved = default["layers_moved"]
    current = [place[state["at"]][i] for i in range(LAYERS)]  # what each layer holds
    sync_layers = [0]  # where each layer is now, for sync moves back and forth

    def sync_step(i: int) -> None:
        # The same number of layer moves as the default async run made, over the forwards.
        if (i * moved) // forwards != ((i + 1) * moved) // forwards:
            layer = sync_layers[0] % LAYERS
            o, n = place["old"][layer], place["new"][layer]
            target = n if torch.equal(current[layer], o) else o
            eplb.move_experts(weights[layer], current[layer], target, timeout=120.0)
            current[layer] = target
            sync_layers[0] += 1

    sync_s = loop(sync_step)
    correct_sync = all(holds(weights[i], current[i], rank) for i in range(LAYERS))
    # Leave every layer where state says, for any later part.
    for layer in range(LAYERS):
        target = place[state["at"]][layer]
        if not torch.equal(current[layer], target):
            eplb.move_experts(weights[layer], current[layer], target, timeout=120.0)
    return {
        "forwards": forwards,
        "matmuls_per_forward": MATMULS_PER_FORWARD,
        "matmul_size": ctx["size"]["mm"],
        "forward_wait": "current stream (device-wide only where marked device_sync)",
        "mover_options": {"max_layers_in_flight": 1, "profile": True},
        "compute_alone_seconds": base,
        "default_max_ctas": DEFAULT_MAX_CTAS,
        "configs": configs,
        "headline_transport": default["transfer_config"]["group"],
        "layers_moved": moved,
        "async_loop_seconds": default["async_loop_seconds"],
        "sync_loop_seconds": sync_s,
        "async_slowdown": default["async_slowdown"],
        "sync_slowdown": sync_s / base_s - 1,
        "async_added_seconds_per_layer": default["async_added_seconds_per_layer"],
        "sync_added_seconds_per_layer": (sync_s - base_s) / max(moved, 1),
        "correct_async": all(c["correct"] for c in configs),
        "correct_sync": correct_sync,
    }


def versions(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
    }
    if device.type == "cuda":
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError) as err:
            driver = f"unavailable ({err})"
        info.update(
            device=torch.cuda.get_device_name(device),
            driver=driver,
            cuda=str(torch.version.cuda),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            sms=torch.cuda.get_device_properties(device).multi_processor_count,
        )
    else:
        info["device"] = "cpu"
    return info


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; anything else sanitised."""
    match = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    tag = match.group(1) if match else name
    return re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_") or "device"


def worker(
    rank: int, world: int, port: int, args: argparse.Namespace, out: str, env_set: list[str]
) -> None:
    os.environ.update(NVLS_OFF)
    torch.set_num_threads(1 if args.cpu else torch.get_num_threads())
    if args.cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    size = SMALL if args.small else REAL
    record = {
        **versions(device),
        "command": " ".join([sys.executable, *sys.argv]),
        "ranks": world,
        "backend": backend,
        "env_set_by_bench": env_set,
        "env": {k: os.environ.get(k) for k in NVLS_OFF},
        "sizes": size,
        "dtype": "bfloat16",
        "targets": TARGETS,
    }
    path = Path(out)

    def save() -> None:
        if rank == 0:
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    try:
        place = placements(world, size["slots"])
        record["placement"] = {
            k: place[k] for k in ("num_logical", "drift_sigma", "changed_share", "sync_layer")
        }
        weights = layer_weights(size, place, rank, device)
        ctx = {
            "rank": rank,
            "world": world,
            "device": device,
            "clock": Clock(device),
            "place": place,
            "weights": weights,
            "size": size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "forwards": args.forwards,
            "loops": args.loops,
            "group": None,
            "control": dist.new_group(backend="gloo"),  # CPU group of every rank (collective)
            "ctas": args.ctas,
            "compute_dtype": torch.float32 if args.cpu else torch.bfloat16,
        }
        parts = {"sync": bench_sync, "async": bench_async}
        for name, part in ((name, parts[name]) for name in args.parts):
            begin = time.perf_counter()
            result = record[name] = {}
            try:
                result.update(part(ctx, result))
            except Exception:  # keep what this part and the other part measured
                result["error"] = traceback.format_exc()
                print(f"rank {rank}: {result['error']}", flush=True)
            save()
            if rank == 0:
                print(f"{name} part: {time.perf_counter() - begin:.1f} s", flush=True)
    finally:
        save()
        dist.destroy_process_group()


def summary(record: dict) -> str:
    lines = [f"{record.get('device')} x{record.get('ranks')}  torch {record.get('torch')}"]
    s = record.get("sync", {})
    if "move_seconds_median" in s:
        lines.append(
            f"sync move: {s['bytes_moved'] / 1e9:.2f} GB moved (lower bound "
            f"{s['bytes_lower_bound'] / 1e9:.2f} GB), {s['changed_slots']}/{s['slots']} slots "
            f"changed; {s['move_seconds_median'] * 1e3:.2f} ms = {s['move_gbps_per_rank']:.0f} "
            f"GB/s per rank vs P2P {s['p2p_gbps_per_rank']:.0f} GB/s: "
            f"{s['move_vs_ideal']:.2f}x the ideal {s['ideal_seconds'] * 1e3:.2f} ms "
            f"(target {TARGETS['move_vs_ideal']}x)"
        )
        if s.get("p2p_copy_engine_gbps_per_rank"):
            lines.append(
                f"  copy-engine P2P {s['p2p_copy_engine_gbps_per_rank']:.0f} GB/s: "
                f"{s['move_vs_ideal_best_p2p']:.2f}x the best P2P ideal "
                f"{s['ideal_seconds_best_p2p'] * 1e3:.2f} ms"
            )
        if s.get("transport_group"):
            g = s["transport_group"]
            lines.append(
                f"  over the group (NCCL): {g['move_seconds_median'] * 1e3:.2f} ms = "
                f"{g['move_vs_ideal']:.2f}x the ideal"
            )
        if s.get("without_row_kernel"):
            c = s["without_row_kernel"]
            lines.append(
                f"  without the row-copy kernel (copy_ per row): "
                f"{c['move_seconds_median'] * 1e3:.2f} ms = {c['move_vs_ideal']:.2f}x the ideal"
            )
    if "phase_seconds_median_per_rank" in s:
        slowest_rank = max(s["phase_seconds_median_per_rank"], key=lambda p: sum(p.values()))
        lines.append(
            f"  profiled {s['move_seconds_profiled_median'] * 1e3:.2f} ms, slowest rank: "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in slowest_rank.items())
            + f" ms; gloo control {s['move_seconds_gloo_control_median'] * 1e3:.2f} ms; "
            f"{s['move_vs_ideal_max_sent_or_received']:.2f}x max(sent, received) / P2P"
        )
    a = record.get("async", {})
    if "async_slowdown" in a:
        lines.append(
            f"compute loop with {a['layers_moved']} layers moved: async +"
            f"{a['async_slowdown']:.1%} ({a['headline_transport']}; target < "
            f"{TARGETS['async_slowdown']:.0%}), sync +{a['sync_slowdown']:.1%}"
        )
    if a.get("configs"):
        for c in a["configs"]:
            gbps = [f"{g:.0f}" if g is not None else "-" for g in c["transfer_gbps_per_rank"]]
            lines.append(
                f"  {c['transfer_config']['group']}, max_ctas {c['transfer_config']['max_ctas']}: "
                f"+{c['async_slowdown']:.1%}, {c['layers_moved']} "
                f"layers, {c['async_added_seconds_per_layer'] * 1e3:.2f} ms/layer, transfers "
                f"{'/'.join(gbps)} GB/s per rank"
                + (
                    f"; device-wide sync per forward +{c['async_device_sync_slowdown']:.1%}"
                    if "async_device_sync_slowdown" in c
                    else ""
                )
            )
    for part in ("sync", "async"):
        if "error" in record.get(part, {}):
            lines.append(f"{part}: FAILED (see the JSON)")
    return "\n".join(lines)


def ctas_list(text: str) -> list[int | None]:
    """'none,1,4' -> [None, 1, 4] (argparse type)."""
    try:
        out = [None if v.strip().lower() == "none" else int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ints or 'none': {text!r}") from None
    if not out or any(v is not None and not 1 <= v <= 64 for v in out):
        raise argparse.ArgumentTypeError(f"max_ctas values must be 1..64 or 'none': {text!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: all GPUs)")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (smoke test)")
    parser.add_argument("--small", action="store_true", help="tiny experts and matmuls")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--forwards", type=int, default=60, help="forwards per compute loop")
    parser.add_argument(
        "--loops", type=int, default=3, help="paired loops (alone, with the mover) per config"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="kill the run after this")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--ctas",
        type=ctas_list,
        default=ctas_list("none,1,2,4,8"),
        help="async mover max_ctas values to run, comma-separated ('none': the group's own)",
    )
    parser.add_argument(
        "--parts",
        type=lambda text: text.split(","),
        default=["sync", "async"],
        help="comma-separated parts to run: sync, async (default both)",
    )
    args = parser.parse_args()
    if not args.parts or not set(args.parts) <= {"sync", "async"}:
        parser.error(f"--parts must name sync and/or async, got {','.join(args.parts)}")
    if args.loops < 1 or args.forwards < 1:
        parser.error(
            f"--loops and --forwards must be at least 1, got {args.loops}, {args.forwards}"
        )
    env_set = sorted(k for k in NVLS_OFF if k not in os.environ)
    os.environ.update({k: NVLS_OFF[k] for k in env_set})
    if env_set:
        print(f"set {', '.join(f'{k}={NVLS_OFF[k]}' for k in env_set)} (NVLink multicast off)")
    for key, value in NVLS_OFF.items():
        if os.environ[key] != value:
            raise SystemExit(f"{key}={os.environ[key]}: NVLink multicast must stay off ({value})")
    if args.cpu:
        world, name = args.gpus or 2, "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: use --cpu --small for a smoke test")
        world = args.gpus or torch.cuda.device_count()
        if world < 2 or world > torch.cuda.device_count():
            raise SystemExit(f"need 2..{torch.cuda.device_count()} GPUs, got --gpus {world}")
        name = device_tag(torch.cuda.get_device_name(0))
    unit = "proc" if args.cpu else "gpu"
    out = args.out or ROOT / "bench" / "results" / f"moves_{world}{unit}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(
        worker,
        args=(world, port, args, str(out), env_set),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + args.timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            print(f"killed after {args.timeout:.0f} s; partial results (if any) in {out}")
            break
    if out.exists():
        print(summary(json.loads(out.read_text())))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
