"""Probe: does splitting a synchronous move's pushes between the row-copy kernel and the copy
engines beat either alone? (docs/moves.md, "What bounds a synchronous move".)

Every rank pushes 21 rows of 29 MiB (about a DeepSeek-V3 expert's matrix each), split evenly
over the other ranks and interleaved by receiver as ``move_experts`` orders them, into the
peers' symmetric memory:

* ``kernel``: one launch of the row-copy kernel (``eplb.row_copy.PUSH``);
* ``ce_<n>stream(s)``: copy engines, one copy per receiver, on n streams;
* ``hybrid_<share>[_2streams]``: the first ``share`` of every row on copy engines, the rest by
  the kernel, at the same time.

Each variant: the slowest rank's wall time from a drained device to a drained device (host time
to queue included, as bench_moves times a move), median of 20 after 3 warm-up runs.

Usage: ``python bench/probe_push_split.py GPUS OUT.json`` (one process per GPU).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_moves import slowest, versions

from eplb.fileio import atomic_write_text
from eplb.move_peer import PeerStaging
from eplb.row_copy import PUSH, copy_rows

ROW = 29 << 20
ROWS = 21
SHARES = (0.1, 0.2, 0.3, 0.4)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    peers = [(rank + k) % world for k in range(1, world)]
    rows_per_peer = ROWS // len(peers)
    per_peer = rows_per_peer * ROW
    total = per_peer * len(peers)
    pool = PeerStaging(dist.group.WORLD, device)
    pool.reserve(total)
    src = torch.randint(0, 255, (total,), dtype=torch.uint8, device=device)
    side = [torch.cuda.Stream(device) for _ in range(2)]

    def landing(peer: int) -> int:
        """Byte offset of this rank's rows in ``peer``'s staging (senders in rank order)."""
        return ((rank - peer) % world - 1) * per_peer

    def kernel_part(share: float) -> list[tuple[int, int, int, int]]:
        """(source offset, receiver, offset there, bytes): each row from ``share`` of it on,
        row j to every receiver before row j + 1."""
        skip = int(share * ROW) // 4096 * 4096
        return [
            (i * per_peer + j * ROW + skip, p, landing(p) + j * ROW + skip, ROW - skip)
            for j in range(rows_per_peer)
            for i, p in enumerate(peers)
        ]

    def engine_part(share: float) -> list[tuple[int, int, int, int]]:
        if share >= 1:
            return [(i * per_peer, p, landing(p), per_peer) for i, p in enumerate(peers)]
        head = int(share * ROW) // 4096 * 4096
        return [
            (i * per_peer + j * ROW, p, landing(p) + j * ROW, head)
            for j in range(rows_per_peer)
            for i, p in enumerate(peers)
            if head
        ]

    def push(share: float, streams: int) -> None:
        current = torch.cuda.current_stream(device)
        used = side[:streams]
        for stream in used:
            stream.wait_stream(current)
        for k, (at, peer, there, n) in enumerate(engine_part(share)):
            with torch.cuda.stream(used[k % len(used)]):
                pool.remote(peer, there, n).copy_(src[at : at + n])
        if share < 1:
            copies = kernel_part(share)
            copy_rows(
                device,
                [src.data_ptr() + at for at, _, _, _ in copies],
                [pool.remote_address(peer, there, n) for _, peer, there, n in copies],
                [n for _, _, _, n in copies],
                PUSH,
            )
        for stream in used:
            current.wait_stream(stream)

    variants = {"kernel": (0.0, 1), "ce_1stream": (1.0, 1), "ce_2streams": (1.0, 2)}
    for share in SHARES:
        variants[f"hybrid_{share}"] = (share, 1)
        variants[f"hybrid_{share}_2streams"] = (share, 2)
    ms = {}
    for name, (share, streams) in variants.items():
        samples = []
        for i in range(23):
            dist.barrier()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            push(share, streams)
            torch.cuda.synchronize()
            elapsed = slowest(time.perf_counter() - begin, device)  # collective
            if i >= 3:
                samples.append(elapsed)
        ms[name] = round(statistics.median(samples) * 1e3, 4)
    if rank == 0:
        record = {
            **versions(device),
            "ranks": world,
            "command": " ".join([sys.executable, *sys.argv]),
            "bytes_per_rank": total,
            "ms": ms,
            "gbps_per_rank": {k: round(total / v / 1e6, 1) for k, v in ms.items()},
        }
        atomic_write_text(out, json.dumps(record, indent=1) + "\n")
        print(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    gpus, path = int(sys.argv[1]), sys.argv[2]
    mp.spawn(worker, args=(gpus, 29500 + gpus, path), nprocs=gpus)
