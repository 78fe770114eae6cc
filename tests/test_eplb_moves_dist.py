"""Expert moves across processes (gloo on the CPU, 2 and 4 ranks): bit-exact weights after the
synchronous and the asynchronous mover, byte counts against the lower bound, one message per
peer and direction, phase timings, and fault injection (a rank raising before it posts its
transfers, also after a good move on the group; a send that never comes; a rank whose weights
have another layout; a rank with a bad placement).

One spawn per world size runs everything (moves_cases.gloo_worker); the tests check its record.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from moves_cases import (
    after_move,
    equal_weights,
    gloo_worker,
    random_case,
    rank_weights,
    spawn,
)

from eplb import ExpertMover, min_move_bytes, move_experts, plan_moves
from eplb.move_exec import PHASES

SEEDS = [3, 11, 28]
SLOTS = 3
SCENARIOS = ["raise", "skip", "async", "layout", "layout_async", "bad", "raise_warm"]
FAULT_TIMEOUT = 1.0


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world = request.param
    out = tmp_path_factory.mktemp(f"moves{world}")
    # File rendezvous: ports picked up front can be taken by the earlier groups' connections.
    places = [f"file://{out}/group{i}" for i in range(1 + len(SCENARIOS))]
    args = (places, str(out), SEEDS, SLOTS, SCENARIOS, FAULT_TIMEOUT)
    spawn(gloo_worker, world, args, timeout=240)
    return world, [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def _lower_bound(old: list[int], new: list[int], world: int) -> int:
    """Experts each rank needs and lacks, counted with plain sets (the oracle)."""
    count = 0
    for r in range(world):
        have = set(old[r * SLOTS : (r + 1) * SLOTS])
        want = {e for e in new[r * SLOTS : (r + 1) * SLOTS] if e >= 0}
        count += len(want - have)
    return count


def test_sync_moves_send_exactly_the_lower_bound(run: tuple) -> None:
    # (Bit-exact weights are asserted inside the workers after every move.)
    world, records = run
    expert_bytes = 3 * 4 * 2 + 5 + 2 * 4  # moves_cases.KINDS: bf16 3x4, int8 5, float32 2
    for i, seed in enumerate(SEEDS):
        old, new = random_case(seed, world, SLOTS)
        plan = plan_moves(old, new, world)
        sent = [rec["moves"]["sync"][i][1] for rec in records]
        received = [rec["moves"]["sync"][i][2] for rec in records]
        assert received == [len(plan.recvs[r]) * expert_bytes for r in range(world)]
        assert sent == [len(plan.sends[r]) * expert_bytes for r in range(world)]
        bound = _lower_bound(old, new, world) * expert_bytes
        assert sum(received) == sum(sent) == plan.bytes(expert_bytes) == bound
        assert min_move_bytes(old, new, world, expert_bytes) == bound
        # One message per peer and direction: the distinct receivers / senders of each rank.
        for r, rec in enumerate(records):
            peers_to = {dst for dst, _ in plan.sends[r]}
            peers_from = {src for src, _, _ in plan.recvs[r]}
            assert rec["moves"]["sync"][i][3] == (len(peers_to), len(peers_from)), (seed, r)
            assert rec["moves"]["sync"][i][4] == sorted(PHASES)


def test_async_mover_commits_the_same_layers_at_the_same_step_everywhere(run: tuple) -> None:
    _, records = run
    for k in range(len(records[0]["moves"]["async"])):
        steps = [rec["moves"]["async"][k][0] for rec in records]
        assert all(s == steps[0] for s in steps), steps
        assert sorted(i for step in steps[0] for i in step) == [0, 1, 2, 3]
        assert sum(rec["moves"]["async"][k][1] for rec in records) > 0
        for rec in records:
            _, received, sent, config, phases = rec["moves"]["async"][k]
            # gloo: the transfers run on the group itself whatever max_ctas says.
            assert config["max_ctas"] is None and config["group"] == "group"
            assert "NCCL" in config["note"]
            assert {"exchange", "launch", "commit"} <= set(phases)
            # The waiter thread timed the transfers of every rank that had any.
            assert ("transfer" in phases) == (received + sent > 0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fault_raises_on_every_rank_quickly_and_leaves_weights_intact(
    run: tuple, scenario: str
) -> None:
    _, records = run
    for rank, rec in enumerate(records):
        got = rec["faults"][scenario]
        assert got["raised"] is not None, f"rank {rank} did not raise"
        # A rank with bad arguments raises their ValueError, the others ExpertMoveError.
        error = "ValueError" if scenario == "bad" and rank == 1 else "ExpertMoveError"
        assert got["raised"].startswith(error), (rank, got["raised"])
        assert got["intact"], f"rank {rank}: uncommitted weights changed"
        assert got["done"], f"rank {rank}: the mover is not done after the error"
        # Bounded by the move's own waits, not by the group's timeout.
        assert got["seconds"] < 3 * FAULT_TIMEOUT + 2, (rank, got["seconds"])
    committed = [rec["faults"][scenario]["committed"] for rec in records]
    # The async fault hits layer 1: layer 0 may commit, but then on every rank; 1 and 2 never.
    assert all(c == committed[0] for c in committed), committed
    assert set(committed[0]) <= {0}


# One rank without torch.distributed: the staging and commit logic alone (swaps, cycles,
# duplicates, overwritten copy sources), and the argument checks.


@pytest.mark.parametrize("seed", range(12))
def test_one_rank_move_is_bit_exact(seed: int) -> None:
    old, new = random_case(seed, 1, 7)
    weights = rank_weights(old, 0, 7, 0)
    stats = move_experts(weights, torch.tensor(old), torch.tensor(new))
    assert equal_weights(weights, rank_weights(after_move(old, new), 0, 7, 0))
    assert stats.bytes_sent == stats.bytes_received == 0 and stats.layers == (0,)


def test_one_rank_swap_cycle_reads_old_contents() -> None:
    old, new = [0, 1, 2, 3], [1, 2, 0, 0]  # a 3-cycle; slot 3 copies from overwritten slot 0
    weights = rank_weights(old, 0, 4, 0)
    plan = plan_moves(old, new, 1)
    stats = move_experts(weights, torch.tensor(old), torch.tensor(new), plan=plan)
    assert equal_weights(weights, rank_weights(new, 0, 4, 0))
    assert stats.bytes_copied == 4 * (3 * 4 * 2 + 5 + 2 * 4)


def test_one_rank_mover_commits_layer_by_layer_and_aborts() -> None:
    cases = [random_case(40 + i, 1, 5) for i in range(3)]
    weights = [rank_weights(o, 0, 5, i) for i, (o, _) in enumerate(cases)]
    mover = ExpertMover(weights, max_layers_in_flight=1)
    assert mover.done and mover.step() == []
    mover.start(torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases]))
    with pytest.raises(RuntimeError, match="in progress"):
        mover.start(torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases]))
    committed = []
    while not committed:
        committed = mover.step()
    assert committed == [0] and mover.pending == (1, 2)
    mover.abort()
    assert mover.done and mover.committed == (0,)
    for i, (o, n) in enumerate(cases):
        want = after_move(o, n) if i == 0 else o
        assert equal_weights(weights[i], rank_weights(want, 0, 5, i))


def test_launch_thread_pause_waits_while_step_runs() -> None:
    """On GPUs the launch thread calls ``_pause`` between rows: it must block while ``step()``
    runs (even one that raises), go on afterwards, and be released by a failure inside
    ``step()`` before it waits for the launch thread (else the two would wait for each other).
    """
    old, new = random_case(7, 1, 4)
    mover = ExpertMover([rank_weights(old, 0, 4, 0)], max_layers_in_flight=1)
    mover.start(torch.tensor([old]), torch.tensor([new]))
    seen = []

    def step_body() -> list[int]:
        paused = threading.Thread(target=mover._pause)
        paused.start()
        paused.join(0.2)
        seen.append(paused.is_alive())  # parked while step() runs
        mover._fail()  # a failure inside step() releases it
        paused.join(2.0)
        seen.append(paused.is_alive())
        raise RuntimeError("fault inside step")

    mover._step = step_body
    with pytest.raises(RuntimeError, match="fault inside step"):
        mover.step()
    assert seen == [True, False]
    idle = threading.Thread(target=mover._pause)
    idle.start()
    idle.join(2.0)
    assert not idle.is_alive()  # after step(), even a failed one, the thread goes on


def test_one_rank_move_of_odd_dtypes_and_shapes() -> None:
    # Rows travel as bytes: 1-D weights, empty trailing shapes, bool and complex all survive a
    # 3-cycle with a copy from an overwritten slot (staged through the byte buffer).
    old, new = [0, 1, 2, 3], [1, 2, 0, 0]
    gen = torch.Generator().manual_seed(5)
    contents = [
        torch.randn(4, generator=gen, dtype=torch.float64),
        torch.empty(4, 0, 3),
        torch.randint(0, 2, (4, 5), generator=gen).bool(),
        torch.randn(4, 2, generator=gen, dtype=torch.complex64),
    ]
    weights = [c.clone() for c in contents]
    stats = move_experts(weights, torch.tensor(old), torch.tensor(new), profile=True)
    for got, was in zip(weights, contents, strict=True):
        assert torch.equal(got, was[torch.tensor(new)])
    assert sorted(stats.phases) == sorted(PHASES)
    assert stats.bytes_copied == 4 * (8 + 0 + 5 + 16)


def test_move_argument_checks() -> None:
    old, new = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    weights = rank_weights([0, 1, 2], 0, 3, 0)
    with pytest.raises(TypeError, match="weights"):
        move_experts(weights[0], old, new)
    with pytest.raises(ValueError, match="weights is empty"):
        move_experts([], old, new)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        move_experts([weights[0], weights[1][:2]], old, new)
    with pytest.raises(ValueError, match="contiguous"):
        move_experts([weights[0].transpose(1, 2)], old, new)
    with pytest.raises(ValueError, match="slots per rank"):
        move_experts(weights, torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="one layer"):
        move_experts(weights, old[None], new[None])
    with pytest.raises(ValueError, match="other placements"):
        move_experts(weights, old, new, plan=plan_moves(old, old, 1))
    with pytest.raises(ValueError, match="timeout"):
        move_experts(weights, old, new, timeout=0)
    with pytest.raises(TypeError, match="group"):
        move_experts(weights, old, new, group="world")
    with pytest.raises(ValueError, match="L = 1 layers"):
        ExpertMover([weights]).start(old, new)
    with pytest.raises(ValueError, match="max_layers_in_flight"):
        ExpertMover([weights], max_layers_in_flight=0)
    with pytest.raises(TypeError, match="profile"):
        move_experts(weights, old, new, profile="yes")
    with pytest.raises(TypeError, match="control_group"):
        move_experts(weights, old, new, control_group="gloo")
    with pytest.raises(ValueError, match="max_ctas"):
        ExpertMover([weights], max_ctas=0)
    with pytest.raises(ValueError, match="max_ctas"):
        ExpertMover([weights], max_ctas=65)
    with pytest.raises(TypeError, match="max_ctas"):
        ExpertMover([weights], max_ctas=2.0)
    with pytest.raises(TypeError, match="profile"):
        ExpertMover([weights], profile=1)
    with pytest.raises(ValueError, match="transport"):
        move_experts(weights, old, new, transport="nvlink")
    with pytest.raises(TypeError, match="transport"):
        move_experts(weights, old, new, transport=1)
    with pytest.raises(ValueError, match="transport='peer'"):  # CPU weights, one rank
        move_experts(weights, old, new, transport="peer")
    with pytest.raises(ValueError, match="transport"):
        ExpertMover([weights], transport="copy")
    with pytest.raises(ValueError, match="transport='peer'"):
        ExpertMover([weights], transport="peer")
    assert equal_weights(weights, rank_weights([0, 1, 2], 0, 3, 0))  # nothing moved
