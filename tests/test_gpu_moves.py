"""Expert moves on GPUs with NCCL, one process per visible GPU (at least two): the same
bit-exact checks as the CPU test (sync moves, async mover with the automatic gloo control
group), on bf16 experts with float32 scales."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from moves_cases import NVLS_OFF, free_port, nccl_worker, random_case, spawn

from eplb import plan_moves

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
    for k in range(len(records[0]["async"])):
        steps = [rec["async"][k][0] for rec in records]
        assert all(s == steps[0] for s in steps), steps
        assert sorted(i for step in steps[0] for i in step) == [0, 1, 2, 3]
