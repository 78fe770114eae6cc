"""Expert moves on GPUs with NCCL, one process per visible GPU (at least two): the same
bit-exact checks as the CPU test (sync moves -- also profiled and with a gloo control group --
and the async mover with the automatic gloo control group, on its own NCCL group limited to
max_ctas CTAs and on the group itself), on bf16 experts with float32 scales."""

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
    nccl_worker,
    random_case,
    spawn,
)

from eplb import plan_moves
from eplb.move_async import DEFAULT_MAX_CTAS
from eplb.move_exec import PHASES

SEEDS = [5, 17]
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
        for r, rec in enumerate(records):  # one message per peer and direction
            messages = (len({d for d, _ in plan.sends[r]}), len({s for s, _, _ in plan.recvs[r]}))
            assert rec["sync"][i][3] == messages and rec["sync"][i][4] == sorted(PHASES)
    runs = ASYNC_RUNS + NCCL_ASYNC_RUNS
    assert len(records[0]["async"]) == len(runs)
    for k, (_, _, options) in enumerate(runs):
        steps = [rec["async"][k][0] for rec in records]
        assert all(s == steps[0] for s in steps), steps
        assert sorted(i for step in steps[0] for i in step) == [0, 1, 2, 3]
        max_ctas = options.get("max_ctas", DEFAULT_MAX_CTAS)
        for rec in records:
            _, received, sent, config, phases = rec["async"][k]
            assert config == {
                "max_ctas": max_ctas,
                "group": "group" if max_ctas is None else "own NCCL group",
            }, config
            # Profiled runs time the GPU work of every layer this rank sent or received in.
            if options.get("profile", False) and received + sent > 0:
                assert {"stage_gpu", "transfer_gpu"} <= set(phases), phases
            else:
                assert "transfer_gpu" not in phases and "stage_gpu" not in phases, phases
