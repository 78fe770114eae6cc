"""Shared by the expert-move tests: expert contents, random placements, process workers.

Every logical expert of every layer has its own deterministic content (one tensor per weight
kind, mixed dtypes and trailing shapes), so after a move each slot can be compared bit for bit
with the content of the expert the new placement puts there. Unused slots get content of their
own, keyed by the slot, so a write into a slot that should stay untouched shows too.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.move_exec import Push

# Weight kinds of one expert: e.g. bf16 weights, int8 quantised weights, float32 scales.
KINDS = ((torch.bfloat16, (3, 4)), (torch.int8, (5,)), (torch.float32, (2,)))
BIG_KINDS = ((torch.bfloat16, (64, 256)), (torch.float32, (7,)))
# KINDS with other scales ([3] instead of [2]): a rank passing these has a different layout.
OTHER_KINDS = (*KINDS[:2], (torch.float32, (3,)))
_UNUSED = 1_000_000  # content key of an unused slot: _UNUSED + global slot
NVLS_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn: Callable[..., None], world: int, args: tuple, timeout: float) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; fail (and kill them) past timeout."""
    ctx = mp.start_processes(
        fn, args=(world, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise AssertionError(f"{world} processes did not finish within {timeout} s (hang)")


def expert_content(layer: int, key: int, kinds: tuple = KINDS) -> list[torch.Tensor]:
    """The weights of logical expert ``key`` of ``layer``: one tensor per kind (CPU)."""
    gen = torch.Generator().manual_seed(1_000_003 * layer + key + 17)
    out = []
    for dtype, shape in kinds:
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            out.append(torch.randint(-128, 128, shape, generator=gen).to(dtype))
    return out


def rank_weights(
    placement: list[int], rank: int, slots: int, layer: int, kinds: tuple = KINDS, device="cpu"
) -> list[torch.Tensor]:
    """Rank ``rank``'s stacked weights ``[slots, ...]`` per kind for ``placement`` ([R])."""
    rows = []
    for s in range(slots):
        p = rank * slots + s
        rows.append(
            expert_content(layer, placement[p] if placement[p] >= 0 else _UNUSED + p, kinds)
        )
    return [
        torch.stack([row[k] for row in rows]).to(device).contiguous() for k in range(len(kinds))
    ]


def after_move(old: list[int], new: list[int]) -> list[int]:
    """What each slot holds after the move: the new expert, or the old content if unused."""
    return [n if n >= 0 else o if o >= 0 else -1 for o, n in zip(old, new, strict=True)]


def random_case(seed: int, world: int, slots: int) -> tuple[list[int], list[int]]:
    """Random (old, new) placements of ``world * slots`` slots with replicas, duplicates on one
    rank and unused slots; every expert of ``new`` is held somewhere in ``old``."""
    rng = random.Random(seed)
    total = world * slots
    num_experts = rng.randint(max(2, total // 3), total)
    old = list(range(num_experts)) + [
        rng.randrange(num_experts) for _ in range(total - num_experts)
    ]
    rng.shuffle(old)
    if total > num_experts:  # leave one copy of a replicated expert unused
        old[rng.choice([p for p, e in enumerate(old) if old.index(e) != p])] = -1
    if rng.random() < 0.5:  # a fresh placement
        new = [rng.randrange(num_experts) for _ in range(total)]
    else:  # a drift: a few slots change, a few swap within a rank, one becomes unused
        new = list(old)
        for p in rng.sample(range(total), k=max(1, total // 4)):
            new[p] = rng.randrange(num_experts)
        for r in range(world):
            a, b = rng.sample(range(r * slots, (r + 1) * slots), 2)
            new[a], new[b] = new[b], new[a]
        new[rng.randrange(total)] = -1
    present = set(old)
    return old, [e if e in present else -1 for e in new]


def init_group(
    rank: int, world: int, where: int | str, backend: str, timeout: float
) -> torch.device:
    """Join a fresh default process group at ``where`` (a TCP port on 127.0.0.1, or an
    ``init_method`` URL: ``file://`` cannot collide with a port the OS handed out meanwhile);
    returns this rank's device."""
    os.environ.update(NVLS_OFF)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=where if isinstance(where, str) else f"tcp://127.0.0.1:{where}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return device


def equal_weights(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b, strict=True))


def _is_send(op: object) -> bool:
    """An isend of the process group, or a push into a peer's staging."""
    return isinstance(op, Push) or op.op is dist.isend


def _count_messages(record: list) -> Callable[[str, dict], None]:
    """A post hook that appends (isends or pushes, irecvs) of every batch of transfers to
    ``record``."""

    def hook(event: str, info: dict) -> None:
        sends = sum(_is_send(op) for op in info["ops"])
        record.append((sends, len(info["ops"]) - sends))

    return hook


def _sync_moves(
    rank: int, world: int, device, seeds: list[int], slots: int, kinds, control
) -> list:
    """Random one-layer moves; asserts bit-exact weights. Seeds alternate the options: none,
    profile with a gloo control group, the control group alone (CUDA: the transport "auto"
    then "group" for each). Returns per seed (seed, sent, received, messages (isends or
    pushes, irecvs) posted, sorted phase names, transport option)."""
    from eplb import move_exec, move_experts

    options = [{}, {"profile": True, "control_group": control}, {"control_group": control}]
    if device.type == "cuda":
        options += [{**o, "transport": "group"} for o in options]
    out = []
    for i, seed in enumerate(seeds):
        option = options[i % len(options)]
        old, new = random_case(seed, world, slots)
        weights = rank_weights(old, rank, slots, 0, kinds, device)
        posted: list = []
        move_exec._FAULT_HOOK = _count_messages(posted)
        try:
            stats = move_experts(
                weights, torch.tensor(old), torch.tensor(new), timeout=30.0, **option
            )
        finally:
            move_exec._FAULT_HOOK = None
        want = rank_weights(after_move(old, new), rank, slots, 0, kinds, device)
        assert equal_weights(weights, want), f"seed {seed}: weights differ after the move"
        assert all(t >= 0 for t in stats.phases.values()), stats.phases
        messages = posted[0] if posted else (0, 0)
        phases = sorted(stats.phases)
        transport = option.get("transport", "auto")
        out.append((seed, stats.bytes_sent, stats.bytes_received, messages, phases, transport))
    return out


def _ahead_moves(rank: int, world: int, device, seeds: list[int], slots: int, kinds) -> list:
    """Each seed's move twice on the same group (default options, the second profiled), from
    fresh weights: the second finds the staging large enough and pushes ahead of the check's
    answer. Asserts bit-exact weights; returns per move (went ahead, sorted phase names)."""
    from eplb import move_exec, move_experts

    ahead: list[bool] = []
    real = move_exec._move_ahead

    def counted(*args, **kwargs):
        ahead.append(True)
        return real(*args, **kwargs)

    out = []
    move_exec._move_ahead = counted
    try:
        for seed in seeds:
            old, new = random_case(seed, world, slots)
            want = rank_weights(after_move(old, new), rank, slots, 0, kinds, device)
            for profile in (False, True):
                weights = rank_weights(old, rank, slots, 0, kinds, device)
                before = len(ahead)
                stats = move_experts(
                    weights, torch.tensor(old), torch.tensor(new), timeout=30.0, profile=profile
                )
                assert equal_weights(weights, want), f"seed {seed}: weights differ after the move"
                out.append((len(ahead) > before, sorted(stats.phases)))
    finally:
        move_exec._move_ahead = real
    return out


def _without_row_kernel(fn: Callable[..., list], *args) -> list:
    """``fn(*args)`` with move_experts copying rows by copy_ calls (copy engines for the
    pushes) instead of the row-copy kernel."""
    from eplb import move_exec

    before, move_exec.ROW_KERNEL = move_exec.ROW_KERNEL, False
    try:
        return fn(*args)
    finally:
        move_exec.ROW_KERNEL = before


def _async_moves(
    rank: int, world: int, device, seed: int, slots: int, kinds, max_in_flight: int, options: dict
) -> tuple[list[list[int]], int, int, dict, list[str]]:
    """An ExpertMover (``options``: more constructor arguments) over four layers (one
    unchanged). After every step(), committed layers hold the new experts and all others still
    the old ones, bit for bit; at most ``max_in_flight`` layers that move data are in flight.
    Returns (commits per step, bytes received, bytes sent, transfer_config, sorted phase
    names)."""
    from eplb import ExpertMover

    cases = [random_case(seed * 10 + layer, world, slots) for layer in range(4)]
    cases[2] = (cases[2][0], cases[2][0])
    weights = [rank_weights(o, rank, slots, i, kinds, device) for i, (o, _) in enumerate(cases)]
    mover = ExpertMover(weights, max_layers_in_flight=max_in_flight, timeout=30.0, **options)
    mover.start(torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases]))
    steps: list[list[int]] = []
    done: set[int] = set()
    while not mover.done and len(steps) < 5000:
        # Layers with a slot to fill hold staging (the others move no data at all).
        staged = [
            i
            for i in mover.in_flight
            if any(n >= 0 and n != o for o, n in zip(*cases[i], strict=True))
        ]
        assert len(staged) <= max_in_flight, f"{staged} staged at once"
        committed = mover.step()
        steps.append(committed)
        done.update(committed)
        for i, (o, n) in enumerate(cases):
            expect = rank_weights(
                after_move(o, n) if i in done else o, rank, slots, i, kinds, device
            )
            assert equal_weights(weights[i], expect), f"layer {i} (committed: {i in done})"
        time.sleep(0.002)  # a forward pass
    assert mover.done and sorted(done) == list(range(len(cases))), (done, mover.pending)
    phases = mover.stats.phases
    assert all(t >= 0 for t in phases.values()), phases
    stats = mover.stats
    return steps, stats.bytes_received, stats.bytes_sent, mover.transfer_config, sorted(phases)


# ExpertMover runs: (max_layers_in_flight, seed index, constructor options). On one host with
# NCCL the default transport stages through peer memory; with transport "group" the default
# max_ctas makes a transfer group of its own and None transfers on the group itself.
ASYNC_RUNS = ((1, 0, {}), (2, -1, {"profile": True}))
NCCL_ASYNC_RUNS = (
    (1, 0, {"max_ctas": None, "transport": "group"}),
    (2, -1, {"max_ctas": 1, "profile": True, "transport": "group"}),
    (3, 1, {"transport": "peer", "max_ctas": None}),
)


def check_moves(rank: int, world: int, device: torch.device, seeds: list[int], slots: int) -> dict:
    """Sync and async moves in the current default group (see the two helpers above)."""
    cuda = device.type == "cuda"
    kinds = BIG_KINDS if cuda else KINDS
    control = dist.new_group(backend="gloo")  # a CPU group with every rank (collective)
    runs = ASYNC_RUNS + (NCCL_ASYNC_RUNS if cuda else ())
    return {
        "sync": _sync_moves(rank, world, device, seeds, slots, kinds, control),
        "ahead": _ahead_moves(rank, world, device, seeds, slots, kinds) if cuda else [],
        "ahead_copy": _without_row_kernel(_ahead_moves, rank, world, device, seeds, slots, kinds)
        if cuda
        else [],
        "async": [
            _async_moves(rank, world, device, seeds[i], slots, kinds, in_flight, options)
            for in_flight, i, options in runs
        ],
    }


def _shifted(world: int, slots: int) -> tuple[list[int], list[int]]:
    """Every rank holds its own experts, then takes over the next rank's: all ranks send."""
    total = world * slots
    return list(range(total)), [(p + slots) % total for p in range(total)]


def _inject(scenario: str, late_by: float) -> Callable[[str, dict], None]:
    """The fault of ``scenario``: rank 1 raises before posting its transfers ("raise"), or
    sleeps ``late_by`` seconds first ("slow"), or rank 0 skips its first send ("skip";
    "async": only for layer 1)."""

    scenario = scenario.removesuffix("_warm")

    def hook(event: str, info: dict) -> None:
        if scenario == "raise" and info["rank"] == 1:
            raise RuntimeError("injected failure before posting the sends")
        if scenario == "slow" and info["rank"] == 1:
            time.sleep(late_by)
        skip = scenario == "skip" or (scenario == "async" and info["layer"] == 1)
        if skip and info["rank"] == 0:
            first_send = next(i for i, op in enumerate(info["ops"]) if _is_send(op))
            del info["ops"][first_send]

    return hook


def check_faults(
    rank: int,
    world: int,
    places: list[int] | list[str],
    scenarios: list[str],
    timeout: float,
    backend: str = "gloo",
) -> dict:
    """Each scenario in a fresh group of ``backend`` (NCCL: the weights on the GPUs, moved
    through peer staging); returns, per scenario, what was raised, how long it took, whether
    every uncommitted layer kept its old weights, and the committed layers.

    Scenarios: see ``_inject``; "layout" / "layout_async": rank 1's weights have another
    layout than the others' (move_experts / ExpertMover); "bad": rank 1 passes a placement
    with an expert that no slot holds (it raises ``ValueError``). A "_warm" suffix first makes
    a good move on the group, so that the faulty one finds peer staging ready and (on NCCL)
    pushes ahead of the check's answer. "slow" (GPUs): rank 1 arrives after the others' timeout;
    the others drain their devices -- which ends when rank 1's exchange reaches them and lets
    any commit queued behind it run -- before their weights are compared."""
    from eplb import ExpertMoveError, ExpertMover, move_exec, move_experts

    slots, layers = 3, 3
    old, new = _shifted(world, slots)
    record = {}
    for where, scenario in zip(places, scenarios, strict=True):
        # A short group timeout: tearing down a group with abandoned transfers waits for it.
        device = init_group(rank, world, where, backend, 2 * timeout)
        # NCCL: peer staging, where a missing push fails its sender (a missing NCCL send
        # would leave a receive pending that no one can cancel).
        transport = {"transport": "peer"} if backend == "nccl" else {}
        if scenario.endswith("_warm"):
            warm = rank_weights(old, rank, slots, 0, KINDS, device)
            move_experts(warm, torch.tensor(old), torch.tensor(new), timeout=timeout, **transport)
        move_exec._FAULT_HOOK = _inject(scenario, late_by=timeout + 2.0)
        kinds = OTHER_KINDS if scenario.startswith("layout") and rank == 1 else KINDS
        weights = [rank_weights(old, rank, slots, i, kinds, device) for i in range(layers)]
        target = list(new)
        if scenario.startswith("bad") and rank == 1:
            target[0] = max(old) + 1  # held by no slot of the old placement
        begin = time.monotonic()
        raised, committed, mover = None, [], None
        try:
            if scenario in ("async", "layout_async"):
                mover = ExpertMover(weights, timeout=timeout, **transport)
                mover.start(torch.tensor([old] * layers), torch.tensor([new] * layers))
                while not mover.done:
                    committed += mover.step()
                    time.sleep(0.002)
            else:
                move_experts(
                    weights[0],
                    torch.tensor(old),
                    torch.tensor(target),
                    timeout=timeout,
                    **transport,
                )
                committed = [0]
        except (ExpertMoveError, ValueError) as err:
            raised = repr(err)
        seconds = time.monotonic() - begin
        move_exec._FAULT_HOOK = None
        if scenario.startswith("slow"):
            torch.cuda.synchronize()
        # After an error the mover is done: no step is pending, a new start() is allowed.
        done = mover is None or (mover.done and mover.step() == [])
        intact = all(
            equal_weights(
                weights[i], rank_weights(new if i in committed else old, rank, slots, i, kinds)
            )
            for i in range(layers)
        )
        record[scenario] = {
            "done": done,
            "raised": raised,
            "seconds": seconds,
            "intact": intact,
            "committed": committed,
        }
        dist.destroy_process_group()
    return record


def gloo_worker(
    rank: int,
    world: int,
    places: list[int] | list[str],
    out: str,
    seeds: list[int],
    slots: int,
    scenarios: list[str],
    fault_timeout: float,
) -> None:
    """CPU processes: the moves on one group, then each fault scenario on a fresh group (one
    spawn for everything: starting processes that import torch dominates the test time).
    ``places``: where each group meets (``init_group``), the moves' first."""
    device = init_group(rank, world, places[0], "gloo", 60.0)
    record = {"moves": check_moves(rank, world, device, seeds, slots)}
    dist.destroy_process_group()
    record["faults"] = check_faults(rank, world, places[1:], scenarios, fault_timeout)
    torch.save(record, Path(out) / f"rank{rank}.pt")


def nccl_fault_worker(
    rank: int, world: int, places: list[str], out: str, scenarios: list[str], timeout: float
) -> None:
    """One process per GPU: the fault scenarios on NCCL groups (peer staging)."""
    record = check_faults(rank, world, places, scenarios, timeout, "nccl")
    torch.save(record, Path(out) / f"faults{rank}.pt")


def nccl_worker(rank: int, world: int, port: int, out: str, seeds: list[int], slots: int) -> None:
    """One process per GPU, NCCL: the same moves as on the CPU."""
    device = init_group(rank, world, port, "nccl", 120.0)
    try:
        record = check_moves(rank, world, device, seeds, slots)
    finally:
        dist.destroy_process_group()
    torch.save(record, Path(out) / f"rank{rank}.pt")
