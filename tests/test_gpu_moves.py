"""Expert moves on GPUs with NCCL, one process per visible GPU (at least two): the same
bit-exact checks as the CPU test (sync moves -- also profiled and with a gloo control group --
through peer staging and over the group, and the async mover with the automatic gloo control
group through peer staging, on its own NCCL group limited to max_ctas CTAs and on the group
itself), on bf16 experts with float32 scales; moves that push ahead of the check's answer
(staging ready from an earlier move), with the row-copy kernel and with copy_ calls; and the
fault scenarios through peer staging, also pushing ahead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from moves_cases import (
    ASYNC_RUNS,
    NCCL_ASYNC_RUNS,
    NVLS_OFF,
    free_port,
    nccl_fault_worker,
    nccl_worker,
    random_case,
    spawn,
)

from eplb import plan_moves
from eplb.move_async import DEFAULT_MAX_CTAS
from eplb.move_exec import PHASES

SEEDS = [5, 17, 23, 31, 40, 52]  # the six option sets of moves_cases._sync_moves on CUDA
SCENARIOS = ["raise", "skip", "async", "layout", "layout_async"]
# After a good move the staging is ready: the faulty move pushes ahead of the check's answer
# (rank 1's other layout needs more staging: it waits for the answer while the others push).
SCENARIOS += ["raise_warm", "skip_warm", "layout_warm", "bad_warm", "slow_warm"]
FAULT_TIMEOUT = 5.0
SLOTS = 6
# moves_cases.BIG_KINDS: bf16 [64, 256] and float32 [7] per expert
EXPERT_BYTES = 64 * 256 * 2 + 7 * 4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least two GPUs"),
]


def test_nccl_moves_are_bit_exact(tmp_path: Path) -> None:
    os.environ.update(NVLS_OFF)  # NVLink multicast stays off, also in the workers
    world = min(torch.cuda.device_count(), 8)
    spawn(nccl_worker, world, (free_port(), str(tmp_path), SEEDS, SLOTS), timeout=300)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, seed in enumerate(SEEDS):
        plan = plan_moves(*random_case(seed, world, SLOTS), world)
        received = [rec["sync"][i][2] for rec in records]
        assert received == [len(plan.recvs[r]) * EXPERT_BYTES for r in range(world)]
        assert sum(rec["sync"][i][1] for rec in records) == plan.bytes(EXPERT_BYTES)
        for r, rec in enumerate(records):
            # One message per peer and direction; peer staging: one push per receiving peer.
            to, since = {d for d, _ in plan.sends[r]}, {s for s, _, _ in plan.recvs[r]}
            peer = rec["sync"][i][5] != "group"
            messages = (len(to), 0 if peer else len(since))
            assert rec["sync"][i][3] == messages and rec["sync"][i][4] == sorted(PHASES)
    for key in ("ahead", "ahead_copy"):  # with the row-copy kernel, then with copy_ calls
        for rec in records:  # each seed's second move pushed ahead of the check's answer
            went = [rec[key][2 * i + 1] for i in range(len(SEEDS))]
            assert went == [(True, sorted(PHASES))] * len(SEEDS), (key, went)
        assert all(rec[key] == records[0][key] for rec in records)
    runs = ASYNC_RUNS + NCCL_ASYNC_RUNS
    assert len(records[0]["async"]) == len(runs)
    for k, (_, _, options) in enumerate(runs):
        steps = [rec["async"][k][0] for rec in records]
        assert all(s == steps[0] for s in steps), steps
        assert sorted(i for step in steps[0] for i in step) == [0, 1, 2, 3]
        max_ctas = options.get("max_ctas", DEFAULT_MAX_CTAS)
        if options.get("transport", "auto") != "group":
            want = {"max_ctas": None, "group": "peer staging (copy engines)"}
            if max_ctas is not None:
                want["note"] = "max_ctas applies to NCCL transfers only"
        else:
            want = {
                "max_ctas": max_ctas,
                "group": "group" if max_ctas is None else "own NCCL group",
            }
        for rec in records:
            _, received, sent, config, phases = rec["async"][k]
            assert config == want, config
            # Profiled runs time the GPU work of every layer this rank sent or received in.
            if options.get("profile", False) and received + sent > 0:
                assert {"stage_gpu", "transfer_gpu"} <= set(phases), phases
            else:
                assert "transfer_gpu" not in phases and "stage_gpu" not in phases, phases


def test_peer_staging_faults_raise_everywhere_and_leave_weights_intact(tmp_path: Path) -> None:
    os.environ.update(NVLS_OFF)
    world = min(torch.cuda.device_count(), 8)
    # File rendezvous: ports picked up front can be taken by the earlier groups' connections.
    places = [f"file://{tmp_path}/group{i}" for i in range(len(SCENARIOS))]
    args = (places, str(tmp_path), SCENARIOS, FAULT_TIMEOUT)
    spawn(nccl_fault_worker, world, args, timeout=300)
    records = [torch.load(tmp_path / f"faults{r}.pt") for r in range(world)]
    for scenario in SCENARIOS:
        for rank, rec in enumerate(records):
            got = rec[scenario]
            assert got["intact"], f"{scenario}, rank {rank}: uncommitted weights changed"
            assert got["seconds"] < 3 * FAULT_TIMEOUT + 10, (scenario, rank, got["seconds"])
            if scenario == "slow_warm" and rank == 1:
                # It arrives after the others gave up, finds every row agreeing and commits;
                # the others closed their gated commits before the agreement reached them.
                assert got["raised"] is None and got["committed"] == [0], got
                continue
            error = "ValueError" if scenario.startswith("bad") and rank == 1 else "ExpertMoveError"
            assert got["raised"] is not None and got["raised"].startswith(error), (rank, got)
            assert got["done"], f"{scenario}, rank {rank}: the mover is not done after the error"
        if scenario == "slow_warm":
            continue
        committed = [rec[scenario]["committed"] for rec in records]
        assert all(c == committed[0] for c in committed), (scenario, committed)
        assert set(committed[0]) <= {0}, (scenario, committed)
