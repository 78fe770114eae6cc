"""Peer staging's layout without GPUs: every rank's LayerMove pushes into the other ranks'
staging through a stand-in for the symmetric buffer (plain CPU tensors, copies done at once),
then commits; each slot must hold its new expert bit for bit (moves_cases' contents). Covers
the row each sender writes at each receiver, the layer's region offset, and the sender's own
check that it pushed every row."""

from __future__ import annotations

import pytest
import torch
from moves_cases import after_move, equal_weights, random_case, rank_weights

from eplb import move_exec, plan_moves
from eplb.move_exec import Comm, LayerMove


class _Done:
    def query(self) -> bool:
        return True


class _Pool:
    """The part of PeerStaging a LayerMove uses: ``local``, ``remote`` and ``push``."""

    def __init__(self, buffers: list[torch.Tensor], rank: int) -> None:
        self.buffers, self.local = buffers, buffers[rank]

    def remote(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        assert offset >= 0 and offset + nbytes <= self.buffers[rank].numel(), "out of bounds"
        return self.buffers[rank][offset : offset + nbytes]

    def push(self, copies: list, pause: object = None) -> _Done:
        for src, rank, offset in copies:
            self.remote(rank, offset, src.numel()).copy_(src)
        return _Done()


def _moves(seed: int, world: int, slots: int, region: int) -> tuple:
    old, new = random_case(seed, world, slots)
    plan = plan_moves(old, new, world)
    weights = [rank_weights(old, r, slots, 0) for r in range(world)]
    expert_bytes = sum(w[0].numel() * w.element_size() for w in weights[0])
    size = region + LayerMove.staging_bytes(plan, expert_bytes) + 7  # slack must stay unused
    buffers = [torch.full((size,), 0xAB, dtype=torch.uint8) for _ in range(world)]
    moves = [
        LayerMove(
            plan,
            weights[r],
            Comm(None, r, world, tuple(range(world)), torch.device("cpu")),
            _Pool(buffers, r),
            region,
        )
        for r in range(world)
    ]
    return old, new, weights, moves, buffers


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_pushes_land_in_the_receivers_rows(seed: int, world: int) -> None:
    region = 64 * (seed % 3)
    old, new, weights, moves, buffers = _moves(seed, world, 5, region)
    for move in moves:  # every rank stages (saves its overwritten copy sources) first
        move.stage()
    for move in moves:
        move.post()
        assert move.transfers_done()
    for move in moves:
        move.commit()
    for r in range(world):
        assert equal_weights(weights[r], rank_weights(after_move(old, new), r, 5, 0)), r
        # Nothing was written before the layer's region or after its rows.
        assert bool((buffers[r][:region] == 0xAB).all()) and bool((buffers[r][-7:] == 0xAB).all())


def test_a_push_left_out_fails_its_sender() -> None:
    cases = (_moves(seed, 2, 5, 0)[3] for seed in range(20))
    moves = next(m for m in cases if any(move.send_to for move in m))
    sender = next(m for m in moves if m.send_to)

    def skip_first(event: str, info: dict) -> None:
        if info["rank"] == sender.comm.rank:
            del info["ops"][0]

    for move in moves:
        move.stage()
    move_exec._FAULT_HOOK = skip_first
    try:
        with pytest.raises(RuntimeError, match="pushed"):
            sender.post()
    finally:
        move_exec._FAULT_HOOK = None


@pytest.mark.parametrize(
    ("env", "blocking"),
    [
        ({}, False),
        ({"TORCH_NCCL_BLOCKING_WAIT": "1"}, True),
        ({"NCCL_BLOCKING_WAIT": "true"}, True),  # the old name
        ({"TORCH_NCCL_BLOCKING_WAIT": "0", "NCCL_BLOCKING_WAIT": "1"}, False),  # new name wins
        ({"TORCH_NCCL_BLOCKING_WAIT": " Yes "}, True),
    ],
)
def test_gated_commits_step_aside_when_nccl_waits_block_the_host(
    monkeypatch: pytest.MonkeyPatch, env: dict, blocking: bool
) -> None:
    """A gated commit makes its stream wait for the exchange: under a blocking NCCL wait that
    would block the host past the move's timeout, so the move then commits after the answer."""
    for name in ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert move_exec.nccl_blocking_wait() is blocking
