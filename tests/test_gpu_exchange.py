"""Workload exchange on GPUs, one process per GPU with an NCCL process group, 2 and 4 ranks.

Both exchanges of lplb/comm.py: the all-reduce (NCCL) and, when lplb was built with NVSHMEM
(LPLB_NVSHMEM=1), the device-side NVSHMEM exchange with each of its two protocols. For each:
Planner.run and solve_probs eagerly, in a CUDA graph replayed with new idx and under
torch.compile(fullgraph=True); then 10,000 exchange calls back to back, eagerly and in a CUDA
graph, with one rank made to lag on every call, each checked on the device against the known
sum.

Oracle: every rank's counts by torch.bincount, gathered with NCCL and summed in a plain loop,
solved and mapped by a single-process Planner (no group) with the same CUDA kernels, so probs
and mappings must be bitwise equal. One spawn per world size runs everything; the tests check
its records.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moves_cases import NVLS_OFF, free_port, spawn

from lplb import Planner, comm, ring, torus_2d

pytestmark = pytest.mark.gpu

N_LOGICAL = 256
TOP_K = 8
ROWS = 4096
CALLS = 3  # eager calls, each with fresh idx
GRAPH_CALLS = 3  # replays of the captured run, each with fresh idx
COMPILED_CALLS = 2
MIXUP_CALLS = 10_000
SKEW_CYCLES = 20_000  # torch.cuda._sleep of ~10 us: the lagging rank of a call starts late
TOPOLOGIES = {2: {"ring(2)": ring(2)}, 4: {"ring(4)": ring(4), "torus_2d(2,2)": torus_2d(2, 2)}}
# nvshmem: the load/store protocol (every peer on this host); nvshmem_put_signal: the protocol
# for peers behind a network, forced here so that one host tests it too.
MODES = ("nccl", "nvshmem", "nvshmem_put_signal")
# One host: NVSHMEM reaches every peer over NVLink, so no remote transport is initialised.
SINGLE_HOST_ENV = {"NVSHMEM_REMOTE_TRANSPORT": "none"}


def _idx(rank: int, call: int, device: torch.device) -> torch.Tensor:
    """[ROWS, TOP_K] int64: top-k of skewed router scores, per rank and call, 2 % dropped (-1)."""
    gen = torch.Generator().manual_seed(1000 * call + rank)
    bias = torch.randn(N_LOGICAL, generator=gen) * 2
    idx = (torch.randn(ROWS, N_LOGICAL, generator=gen) + bias).topk(TOP_K, dim=1).indices
    idx[torch.rand(idx.shape, generator=gen) < 0.02] = -1
    return idx.to(device)


def _summed_counts(idx: torch.Tensor, world: int) -> torch.Tensor:
    """[E] int32: tokens per expert of every rank (bincount, NCCL all_gather, loop sum)."""
    counts = torch.bincount(idx[idx >= 0], minlength=N_LOGICAL)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    total = torch.zeros_like(counts)
    for part in gathered:
        total += part
    return total.to(torch.int32)


def _check_mapping(
    single: Planner, idx: torch.Tensor, out: torch.Tensor, probs: torch.Tensor
) -> dict:
    """Whether run's output equals the single-process mapping with the oracle's probs, and
    whether every token kept its expert (tokens conserved, -1 kept)."""
    n_sms = torch.cuda.get_device_properties(idx.device).multi_processor_count
    _, by_sm = single.count_workload(idx, n_sms)
    expected = single.weighted_select_target(idx, probs, by_sm, n_sms)
    kept = idx >= 0
    phy2log = single.phy2log.to(idx.device, torch.int64)
    return {
        "equal_oracle": torch.equal(out, expected),
        "conserved": bool((out[kept] >= 0).all())  # (a -1 would index phy2log from the end)
        and torch.equal(phy2log[out[kept]], idx[kept])
        and bool((out[~kept] == -1).all()),
    }


def _oracle(single: Planner, idx: torch.Tensor, world: int) -> tuple:
    summed = _summed_counts(idx, world)
    counter = torch.zeros(1, dtype=torch.int64, device=idx.device)
    probs, _ = single.solve_probs(summed, counter)
    return summed, probs


def _mixups(planner: Planner, rank: int, world: int, device: torch.device) -> dict:
    """MIXUP_CALLS exchange calls eagerly, then MIXUP_CALLS in a CUDA graph; call k sums
    (131 k + 17 r + 7 e) mod 1009 over ranks r, and rank k mod world sleeps before it. Every
    wrong entry of every call adds to a device counter read once at the end."""
    exchange = planner._exchange
    base = torch.arange(N_LOGICAL, device=device, dtype=torch.int64)
    ranks = torch.arange(world, device=device, dtype=torch.int64)[:, None]
    step = torch.zeros(1, dtype=torch.int64, device=device)
    errors = torch.zeros(2, dtype=torch.int64, device=device)

    def call(lagging: int, slot: int) -> None:
        step.add_(1)
        everyone = (step * 131 + ranks * 17 + base * 7) % 1009  # [world, E]
        if lagging == rank:
            torch.cuda._sleep(SKEW_CYCLES)
        summed = exchange(everyone[rank].to(torch.int32))
        errors[slot : slot + 1].add_((summed != everyone.sum(0).to(torch.int32)).sum())

    for k in range(MIXUP_CALLS):
        call(k % world, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for k in range(world):
            call(k, 1)
    for _ in range(MIXUP_CALLS // world):
        graph.replay()
    torch.cuda.synchronize()
    eager_errors, graph_errors = errors.tolist()
    return {"eager_errors": eager_errors, "graph_errors": graph_errors, "steps": int(step)}


def _check(rank: int, world: int, r2o: torch.Tensor, mode: str, extended: bool) -> dict:
    device = torch.device("cuda", rank)
    planner = Planner(r2o, N_LOGICAL + 2 * world, N_LOGICAL, group=dist.group.WORLD)
    if mode.startswith("nvshmem"):
        planner.init_nvshmem()
        if mode == "nvshmem_put_signal":
            planner._exchange = comm.NvshmemExchange(
                dist.group.WORLD, N_LOGICAL, protocol="put_signal"
            )
    single = Planner(r2o, N_LOGICAL + 2 * world, N_LOGICAL, ep_size=world)
    rec: dict = {"probs": [], "expected_probs": [], "global": [], "run": [], "counters": []}
    calls = 0  # exchange calls of this planner, to check NVSHMEM's device-side counter

    # Eager: solve_probs and run.
    for call in range(CALLS):
        idx = _idx(rank, call, device)
        summed, expected_probs = _oracle(single, idx, world)
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count
        workload, _ = planner.count_workload(idx, n_sms)
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        probs, global_workload = planner.solve_probs(workload, counter)
        out = planner.run(idx, counter)
        calls += 2
        rec["probs"].append(probs.cpu())
        rec["expected_probs"].append(expected_probs.cpu())
        rec["global"].append(torch.equal(global_workload.flatten(), summed.float()))
        rec["run"].append(_check_mapping(single, idx, out, expected_probs))
        rec["counters"].append((int(counter), 2 * single.n_group))

    # CUDA graph of run, replayed with new idx (the warm-up creates the NCCL communicator's
    # state for this stream and the fast path's plan).
    static_idx = _idx(rank, 0, device)
    graph_counter = torch.zeros(1, dtype=torch.int64, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        planner.run(static_idx, graph_counter)
    torch.cuda.current_stream(device).wait_stream(side)
    calls += 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = planner.run(static_idx, graph_counter)
    rec["graph"] = []
    for call in range(CALLS, CALLS + GRAPH_CALLS):
        idx = _idx(rank, call, device)
        static_idx.copy_(idx)
        graph.replay()
        calls += 1
        _, expected_probs = _oracle(single, idx, world)
        rec["graph"].append(_check_mapping(single, idx, static_out, expected_probs))

    if extended:
        compiled = torch.compile(planner.run, fullgraph=True, backend="aot_eager")
        rec["compiled"] = []
        for call in range(CALLS + GRAPH_CALLS, CALLS + GRAPH_CALLS + COMPILED_CALLS):
            idx = _idx(rank, call, device)
            n_sms = torch.cuda.get_device_properties(device).multi_processor_count
            out = compiled(idx, torch.zeros(1, dtype=torch.int64, device=device), n_sms)
            calls += 1
            _, expected_probs = _oracle(single, idx, world)
            rec["compiled"].append(_check_mapping(single, idx, out, expected_probs))
        rec["mixups"] = _mixups(planner, rank, world, device)
        calls += 2 * MIXUP_CALLS
    if mode.startswith("nvshmem"):
        rec["sequence"] = (int(planner._exchange.sequence), calls)
        rec["load_store"] = planner._exchange.buffers.load_store
    return rec


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(NVLS_OFF)
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
        record: dict = {"modes": ["nccl"]}
        try:
            import lplb._nvshmem  # noqa: F401

            record["modes"] += ["nvshmem", "nvshmem_put_signal"]
        except ImportError as err:
            record["nvshmem_error"] = str(err)
        first = next(iter(TOPOLOGIES[world]))
        for name, r2o in TOPOLOGIES[world].items():
            for mode in record["modes"]:
                record[f"{name}/{mode}"] = _check(rank, world, r2o, mode, extended=name == first)
        torch.cuda.synchronize()
        dist.barrier()
        comm.finalize_nvshmem()
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}gpus")
def records(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world = request.param
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    out = tmp_path_factory.mktemp(f"exchange{world}")
    spawn(_worker, world, (free_port(), str(out)), timeout=300)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _mode_records(records: tuple, mode: str) -> tuple:
    world, recs = records
    if mode not in recs[0]["modes"]:
        pytest.skip(f"lplb was built without NVSHMEM: {recs[0]['nvshmem_error']}")
    return world, recs


@pytest.mark.parametrize("mode", MODES)
def test_probs_bitwise_equal_on_every_rank_and_to_single_process_solve(
    records: tuple, mode: str
) -> None:
    world, recs = _mode_records(records, mode)
    for name in TOPOLOGIES[world]:
        key = f"{name}/{mode}"
        for call in range(CALLS):
            for rank in range(world):
                rec = recs[rank][key]
                assert torch.equal(rec["probs"][call], recs[0][key]["probs"][call]), (key, rank)
                assert torch.equal(rec["probs"][call], rec["expected_probs"][call]), (key, rank)
                assert rec["global"][call], (key, rank, call)  # the summed workload itself
                counted, expected = rec["counters"][call]
                assert counted == expected, (key, rank, call)


@pytest.mark.parametrize("mode", MODES)
def test_run_conserves_tokens_and_matches_single_process_mapping(records: tuple, mode: str) -> None:
    world, recs = _mode_records(records, mode)
    first = next(iter(TOPOLOGIES[world]))
    for name in TOPOLOGIES[world]:
        key = f"{name}/{mode}"
        for rank in range(world):
            rec = recs[rank][key]
            phases = ["run", "graph"] + (["compiled"] if name == first else [])
            for phase in phases:
                for i, check in enumerate(rec[phase]):
                    assert check == {"equal_oracle": True, "conserved": True}, (
                        key,
                        rank,
                        phase,
                        i,
                    )
            if mode.startswith("nvshmem"):
                counted, expected = rec["sequence"]
                assert counted == expected, (key, rank)  # one device-side step per call
                assert rec["load_store"] == (mode == "nvshmem"), (key, rank)


@pytest.mark.parametrize("mode", MODES)
def test_10000_consecutive_calls_never_mix(records: tuple, mode: str) -> None:
    world, recs = _mode_records(records, mode)
    key = f"{next(iter(TOPOLOGIES[world]))}/{mode}"
    for rank in range(world):
        mixups = recs[rank][key]["mixups"]
        assert mixups == {"eager_errors": 0, "graph_errors": 0, "steps": 2 * MIXUP_CALLS}, rank
