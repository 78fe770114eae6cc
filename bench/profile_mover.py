"""Where ``ExpertMover.step()`` and ``move_experts`` spend their host time (not a benchmark:
cProfile adds overhead).

bench_moves.py's async setup (DeepSeek-V3-sized experts, 4 layers moved back and forth, a
matmul loop that waits for each forward and calls ``step()`` in the gap, a gloo control group):
per transport, the host time of every ``step()`` call (median, p90, max, total) on every rank,
the mover's own phase totals, and rank 0's cProfile of its ``step()`` calls (top functions by
own time), as JSON. With ``--sync``: bench_moves.py's synchronous move (the layer it times, there
and back), each call's host time and host time per phase per rank, the host time of posting and
of waiting for one small exchange, rank 0's cProfile of the moves there (by cumulative and by
own time); then the move's pushes alone per number of push streams and order, the same bytes
pushed in 1 to 63 equal copies, and the host time of the parts of posting an exchange with the
stream idle and busy.

    python bench/profile_mover.py [--gpus 2] [--forwards 60] [--sync] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_moves import (
    NVLS_OFF,
    REAL,
    Shuttle,
    compute_loop,
    gathered,
    layer_weights,
    placements,
    slowest,
    stream_wait,
    versions,
)

import eplb
from eplb import move_exec, move_peer
from eplb.fileio import atomic_write_text
from eplb.move_exec import Exchange, LayerMove, comm_of, expert_bytes
from eplb.move_peer import PeerStaging
from eplb.row_copy import copy_rows

TOP = 25  # cProfile rows kept


def profile_transport(ctx: dict, transport: str) -> dict:
    rank, device = ctx["rank"], ctx["device"]
    mover = eplb.ExpertMover(
        ctx["weights"],
        None,
        max_layers_in_flight=1,
        timeout=120.0,
        control_group=ctx["control"],
        transport=transport,
        profile=True,
    )
    shuttle = Shuttle(mover, ctx["place"], ctx["state"])
    shuttle.start()
    forward, wait = ctx["forward"], stream_wait(device)
    profiler = cProfile.Profile()
    step_seconds = []
    dist.barrier()
    for _ in range(ctx["forwards"]):
        forward()
        wait()
        begin = time.perf_counter()
        if rank == 0:
            profiler.enable()
        shuttle.step()
        if rank == 0:
            profiler.disable()
        step_seconds.append(time.perf_counter() - begin)
    wait()
    shuttle.finish()
    step_seconds.sort()
    mine = {
        "median_us": statistics.median(step_seconds) * 1e6,
        "p90_us": step_seconds[int(0.9 * len(step_seconds))] * 1e6,
        "max_us": step_seconds[-1] * 1e6,
        "total_ms": sum(step_seconds) * 1e3,
        "layers_committed": shuttle.layers,
        "mover_phase_seconds": shuttle.phases,
    }
    out = {"transfer_config": mover.transfer_config, "per_rank": gathered(mine)}
    if rank == 0:
        out["rank0_cprofile_by_own_time"] = cprofile_lines(profiler, "tottime")
    return out


def cprofile_lines(profiler: cProfile.Profile, key: str) -> list[str]:
    """The top ``TOP`` rows of ``profiler`` sorted by ``key``, as text lines."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(TOP)
    return [line.rstrip() for line in text.getvalue().splitlines() if line.strip()]


def profile_sync(ctx: dict, moves: int = 20) -> dict:
    """move_experts there and back ``moves`` times (after warm-up), the moves there profiled."""
    rank, device, place = ctx["rank"], ctx["device"], ctx["place"]
    layer = place["sync_layer"]
    old, new = place["old"][layer], place["new"][layer]
    w = ctx["weights"][layer]
    world = dist.get_world_size()
    there, back = eplb.plan_moves(old, new, world), eplb.plan_moves(new, old, world)
    for _ in range(3):
        eplb.move_experts(w, old, new, plan=there)
        eplb.move_experts(w, new, old, plan=back)
    profiler = cProfile.Profile()
    seconds, posting, waiting, phases = [], [], [], []
    comm = comm_of(None, device)
    for _ in range(moves):
        dist.barrier()
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        pending = Exchange(comm, [1, 2, 3])
        posted = time.perf_counter()
        pending.result(60.0)
        posting.append(posted - begin)
        waiting.append(time.perf_counter() - posted)
        dist.barrier()
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        if rank == 0:
            profiler.enable()
        stats = eplb.move_experts(w, old, new, plan=there)
        torch.cuda.synchronize(device)
        if rank == 0:
            profiler.disable()
        seconds.append(time.perf_counter() - begin)
        phases.append(stats.phases)
        eplb.move_experts(w, new, old, plan=back)
    mine = {
        "move_median_us": statistics.median(seconds) * 1e6,
        "exchange_post_median_us": statistics.median(posting) * 1e6,
        "exchange_wait_median_us": statistics.median(waiting) * 1e6,
        "host_phase_median_us": {
            k: statistics.median(p[k] for p in phases) * 1e6 for k in phases[0]
        },
    }
    out = {"layer": layer, "per_rank": gathered(mine)}
    if rank == 0:
        out["rank0_cprofile_by_cumulative"] = cprofile_lines(profiler, "cumulative")
        out["rank0_cprofile_by_own_time"] = cprofile_lines(profiler, "tottime")
    return out


def device_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Slowest rank's median ms of ``fn()`` (the ranks started together, the device drained
    before and after), after two warm-up calls."""
    samples = []
    for _ in range(2 + repeats):
        dist.barrier()
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        samples.append(slowest(time.perf_counter() - begin, device))
    return statistics.median(samples[2:]) * 1e3


def probe_timeline(ctx: dict, moves: int = 20) -> dict:
    """Host timeline of the synchronous move that pushes ahead: each step of move_experts
    wrapped in a timer, per step the median start (microseconds after the call) and duration
    over ``moves`` moves there (the ranks started together, the device drained first)."""
    device, place = ctx["device"], ctx["place"]
    layer = place["sync_layer"]
    old, new = place["old"][layer], place["new"][layer]
    w = ctx["weights"][layer]
    world = dist.get_world_size()
    there, back = eplb.plan_moves(old, new, world), eplb.plan_moves(new, old, world)
    steps = [
        (move_exec, "comm_of"),
        (move_exec, "checked_weights"),
        (move_exec, "layer_plan"),
        (move_exec, "staging_ahead"),
        (move_exec, "_move_ahead"),
        (move_exec.LayerMove, "__init__"),
        (PeerStaging, "order_after_read"),
        (move_exec.LayerMove, "bind"),
        (move_exec.LayerMove, "push_spans"),
        (move_exec.LayerMove, "post"),
        (move_peer, "copy_rows"),
        (move_exec.LayerMove, "stage_local"),
        (move_exec.LayerMove, "prepare_commit"),
        (move_exec, "placement_fingerprint"),
        (move_exec.Exchange, "__init__"),
        (move_exec, "_gated_commit"),
        (move_exec.Exchange, "result"),
        (move_exec, "_verdict"),
        (move_exec, "_commit"),
        (move_exec.LayerMove, "commit"),
        (PeerStaging, "mark_read"),
    ]
    log: list[tuple[str, float, float]] = []
    saved = [(owner, name, getattr(owner, name)) for owner, name in steps]

    def timed(label: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log.append((label, begin, time.perf_counter() - begin))

        return run

    for owner, name, fn in saved:
        label = f"{getattr(owner, '__name__', owner)}.{name}".replace("eplb.", "")
        setattr(owner, name, timed(label, fn))
    per_step: dict[str, list[tuple[float, float]]] = {}
    totals = []
    try:
        for i in range(3 + moves):
            dist.barrier()
            torch.cuda.synchronize(device)
            log.clear()
            begin = time.perf_counter()
            eplb.move_experts(w, old, new, plan=there)
            returned = time.perf_counter() - begin
            torch.cuda.synchronize(device)
            done = time.perf_counter() - begin
            if i >= 3:
                totals.append((returned, done))
                for label, at, took in log:
                    per_step.setdefault(label, []).append((at - begin, took))
            eplb.move_experts(w, new, old, plan=back)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    mine = {
        label: {
            "start_us": statistics.median(a for a, _ in v) * 1e6,
            "us": statistics.median(t for _, t in v) * 1e6,
            "calls_per_move": len(v) / moves,
        }
        for label, v in per_step.items()
    }
    mine["returned_us"] = statistics.median(r for r, _ in totals) * 1e6
    mine["drained_us"] = statistics.median(d for _, d in totals) * 1e6
    return {"per_rank": gathered(mine)}


def push_ms(pool: PeerStaging, copies: list, device: torch.device, repeats: int) -> float:
    """:func:`device_ms` of ``pool.push(copies)``."""
    return device_ms(lambda: pool.push(copies), device, repeats)


def probe_pushes(ctx: dict, repeats: int = 10) -> dict:
    """The pushes of the synchronous move alone: slowest rank's median ms per number of push
    streams and order (LayerMove's interleaved order, or all rows of one receiver first)."""
    rank, device, place = ctx["rank"], ctx["device"], ctx["place"]
    layer, world = place["sync_layer"], dist.get_world_size()
    plan = eplb.plan_moves(place["old"][layer], place["new"][layer], world)
    comm = comm_of(None, device)
    out = {}
    for streams in (1, 2, 4, 8):
        pool = PeerStaging(dist.group.WORLD, device, streams)
        move = LayerMove(plan, ctx["weights"][layer], comm, pool, 0)
        pool.reserve(LayerMove.staging_bytes(plan, move.expert_bytes))
        interleaved = move.push_copies(move.pushes())
        by_receiver = sorted(interleaved, key=lambda c: (c[1] - rank) % world)
        for order, copies in (("interleaved", interleaved), ("by_receiver", by_receiver)):
            out[f"{streams} streams, {order}"] = push_ms(pool, copies, device, repeats)
    return out


def probe_copy_sizes(ctx: dict, repeats: int = 10) -> dict:
    """The busiest rank's received bytes of the synchronous move pushed to the next rank
    (ring-wise, as the copy-engine bandwidth is measured) in k equal copies from one buffer:
    slowest rank's median ms per k, on one and on two streams (what many row-sized copies cost
    against one copy)."""
    rank, device, place = ctx["rank"], ctx["device"], ctx["place"]
    layer, world = place["sync_layer"], dist.get_world_size()
    plan = eplb.plan_moves(place["old"][layer], place["new"][layer], world)
    w = ctx["weights"][layer]
    nbytes = max(len(r) for r in plan.recvs) * expert_bytes(w)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    out = {"bytes": nbytes}
    for streams in (1, 2):
        pool = PeerStaging(dist.group.WORLD, device, streams)
        pool.reserve(nbytes)
        for k in (1, 3, 7, 21, 63):
            chunk = nbytes // k
            dst = (rank + 1) % world
            copies = [(src[i * chunk : (i + 1) * chunk], dst, i * chunk) for i in range(k)]
            out[f"{streams} streams, {k} copies"] = push_ms(pool, copies, device, repeats)
    return out


def probe_row_kernel(ctx: dict, repeats: int = 10) -> dict:
    """The row-copy kernel against copy-engine copies (slowest rank's median ms): the sync
    move's pushes (as many copies as LayerMove makes, in its order) per launch shape (blocks,
    chunk bytes), the busiest receive as one copy to the next rank, and the move's commit
    (staging to live rows; run last: it overwrites the weights with staging bytes)."""
    rank, device, place = ctx["rank"], ctx["device"], ctx["place"]
    layer, world = place["sync_layer"], dist.get_world_size()
    plan = eplb.plan_moves(place["old"][layer], place["new"][layer], world)
    comm = comm_of(None, device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pool = PeerStaging(dist.group.WORLD, device, 2)
    move = LayerMove(plan, ctx["weights"][layer], comm, pool, 0, kernel=True)
    nbytes = LayerMove.staging_bytes(plan, move.expert_bytes)
    pool.reserve(nbytes)
    spans = move.push_spans(move.pushes())
    src = [a for a, _, _, _ in spans]
    dst = [pool.remote_address(r, at, n) for _, r, at, n in spans]
    sizes = [n for _, _, _, n in spans]
    out: dict = {"sms": sms, "copies": len(spans)}
    copies = move.push_copies(move.pushes())
    out["pushes, copy engines (2 streams)"] = push_ms(pool, copies, device, repeats)
    shapes = [(b, c << 10) for b in (1, 2, 4) for c in (64, 256, 1024)]
    for per_sm, chunk in shapes:
        out[f"pushes, kernel {per_sm * sms} blocks {chunk >> 10} KiB"] = device_ms(
            lambda shape=(per_sm, chunk): copy_rows(device, src, dst, sizes, shape),
            device,
            repeats,
        )
    one = torch.ones(nbytes, dtype=torch.uint8, device=device)
    ring = [pool.remote_address((rank + 1) % world, 0, nbytes)]
    out["one copy to the next rank, copy engine"] = push_ms(
        pool, [(one, (rank + 1) % world, 0)], device, repeats
    )
    for per_sm in (1, 2, 4):
        out[f"one copy to the next rank, kernel {per_sm * sms} blocks"] = device_ms(
            lambda shape=(per_sm, 1 << 20): copy_rows(
                device, [one.data_ptr()], ring, [nbytes], shape
            ),
            device,
            repeats,
        )
    move.bind(pool, 0)
    for kernel in (False, True):
        move.kernel = kernel
        move.prepare_commit()
        out[f"commit, {'kernel' if kernel else 'copy_ per row'}"] = device_ms(
            move.commit, device, repeats
        )
    commit_dst, commit_src = move._commit_addresses()
    commit_sizes = [size for _, size, _ in move.kinds] * len(move.writes)
    for per_sm, chunk in shapes:
        out[f"commit, kernel {per_sm * sms} blocks {chunk >> 10} KiB"] = device_ms(
            lambda shape=(per_sm, chunk): copy_rows(
                device, commit_src, commit_dst, commit_sizes, shape
            ),
            device,
            repeats,
        )
    local = torch.empty_like(one)
    out["one local copy of the same bytes (copy_)"] = device_ms(
        lambda: local.copy_(one), device, repeats
    )
    return out


def probe_exchange(ctx: dict, repeats: int = 20) -> dict:
    """Host microseconds (median) of the parts of posting a small exchange on NCCL, with the
    current stream idle and busy (a sleep kernel of about a millisecond queued first): does
    posting wait for the stream?"""
    device = ctx["device"]
    comm = comm_of(None, device)
    table = torch.zeros((comm.size, 4), dtype=torch.int64, device=device)
    rows = [[1, 2**31, 1, 0]] * comm.size
    parts = {
        "Exchange (fill kernels + all-reduce)": lambda: Exchange(comm, [1, 2**31, 1, 0]),
        "all-reduce only": lambda: comm.group.allreduce([table]),
        "pageable to(device)": lambda: torch.tensor(rows).to(device),
        "pinned to(device, non_blocking)": lambda: (
            torch.tensor(rows).pin_memory().to(device, non_blocking=True)
        ),
    }
    out = {}
    for state in ("idle", "busy"):
        for name, part in parts.items():
            samples = []
            for _ in range(repeats):
                dist.barrier()
                torch.cuda.synchronize(device)
                if state == "busy":
                    torch.cuda._sleep(2_000_000)
                begin = time.perf_counter()
                part()
                samples.append(time.perf_counter() - begin)
                torch.cuda.synchronize(device)
            out[f"{name}, {state}"] = statistics.median(samples) * 1e6
    return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(NVLS_OFF)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        place = placements(world, REAL["slots"])
        weights = layer_weights(REAL, place, rank, device)
        ctx = {
            "rank": rank,
            "device": device,
            "place": place,
            "weights": weights,
            "state": {"at": "old"},
            "control": dist.new_group(backend="gloo"),
            "forward": compute_loop(REAL["mm"], device, torch.bfloat16),
            "forwards": args.forwards,
        }
        for _ in range(3):
            ctx["forward"]()
        record = {
            **versions(device),
            "command": " ".join([sys.executable, *sys.argv]),
            "ranks": world,
            "forwards": args.forwards,
        }
        if args.sync:
            record["sync"] = profile_sync(ctx)
            record["timeline"] = probe_timeline(ctx)
            record["pushes_ms"] = probe_pushes(ctx)
            record["copy_sizes_ms"] = probe_copy_sizes(ctx)
            record["row_kernel_ms"] = probe_row_kernel(ctx)
            record["exchange_post_us"] = probe_exchange(ctx)
            if rank == 0:
                atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
                print(json.dumps(record["pushes_ms"], indent=1))
                print(json.dumps(record["copy_sizes_ms"], indent=1))
                print(json.dumps(record["row_kernel_ms"], indent=1))
                print(json.dumps(record["timeline"]["per_rank"][-1], indent=1))
                print(json.dumps(record["exchange_post_us"], indent=1))
                print(json.dumps(record["sync"]["per_rank"], indent=1))
                print("\n".join(record["sync"]["rank0_cprofile_by_cumulative"][:45]))
                print("\n".join(record["sync"]["rank0_cprofile_by_own_time"][:30]))
            return
        record["transports"] = {t: profile_transport(ctx, t) for t in ("group", "auto")}
        if rank == 0:
            atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
            for t, r in record["transports"].items():
                print(t, [round(x["median_us"]) for x in r["per_rank"]], "us median step")
                print("\n".join(r["rank0_cprofile_by_own_time"][:30]))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--forwards", type=int, default=60)
    parser.add_argument("--sync", action="store_true", help="profile move_experts instead")
    parser.add_argument("--out", type=Path, default=Path("profile_mover.json"))
    args = parser.parse_args()
    os.environ.update(NVLS_OFF)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(args.gpus, port, args), nprocs=args.gpus, start_method="spawn")


if __name__ == "__main__":
    main()
