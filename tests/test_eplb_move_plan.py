"""plan_moves / min_move_bytes: a hand-checked plan, the plan rules on random placements
(simulated with a plain-Python executor of the documented semantics), minimality against a
set-based lower bound, sender spreading (the busiest sender against a brute force over every
choice of senders), node preference, and argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import MovePlan, min_move_bytes, plan_moves


def test_hand_checked_plan() -> None:
    # rank 0: [0 1 2 3] -> [1 0 2 4]: swap 0/1 locally, keep 2, receive 4 from rank 1
    # rank 1: [0 4 5 6] -> [6 6 3 0]: 6 copied twice from slot 3, which itself becomes 0
    # (from slot 0, which becomes 6): both sources are overwritten; receive 3 from rank 0
    plan = plan_moves([0, 1, 2, 3, 0, 4, 5, 6], [1, 0, 2, 4, 6, 6, 3, 0], 2)
    assert plan.slots_per_rank == 4 and plan.num_ranks == 2 and plan.layer == 0
    assert plan.keep == ((2,), ())
    assert plan.copies == (((1, 0), (0, 1)), ((3, 0), (3, 1), (0, 3)))
    assert plan.recvs == (((1, 1, 3),), ((0, 3, 2),))
    assert plan.sends == (((1, 3),), ((0, 1),))
    assert plan.num_transfers == 2 and not plan.is_noop
    assert (
        plan.bytes(10)
        == 20
        == min_move_bytes([0, 1, 2, 3, 0, 4, 5, 6], [1, 0, 2, 4, 6, 6, 3, 0], 2, 10)
    )


def test_received_expert_fills_other_slots_by_local_copies() -> None:
    # Rank 1 lacks expert 0 and needs it three times: one receive, two copies of it.
    plan = plan_moves([0, 1, 2, 3], [0, 1, 0, 0], 2)
    assert plan.recvs[1] == ((0, 0, 0),)
    assert plan.copies[1] == ((0, 1),)
    assert plan.sends[0] == ((1, 0),)
    assert plan.bytes(1) == 1


def test_unchanged_and_unused_slots_move_nothing() -> None:
    plan = plan_moves([3, 2, 1, 0], [3, -1, 1, 0], 2)
    assert plan.is_noop and plan.keep == ((0,), (0, 1)) and plan.bytes(100) == 0


def _lower_bound(old: list[int], new: list[int], ranks: int) -> int:
    slots = len(old) // ranks
    total = 0
    for r in range(ranks):
        have = set(old[r * slots : (r + 1) * slots])
        total += len({e for e in new[r * slots : (r + 1) * slots] if e >= 0} - have)
    return total


def _simulate(plan: MovePlan) -> list[object]:
    """Apply the plan as docs/moves.md describes it; slot content = the old slot it came from."""
    slots = plan.slots_per_rank
    content: list[object] = [("old slot", p) for p in range(len(plan.old))]
    after = list(content)
    for r in range(plan.num_ranks):
        base = r * slots
        received = {}
        for src_rank, src_slot, dst in plan.recvs[r]:
            received[dst] = content[src_rank * slots + src_slot]
            after[base + dst] = received[dst]
        for src, dst in plan.copies[r]:
            expert = plan.new[base + dst]
            if plan.old[base + src] == expert:
                after[base + dst] = content[base + src]  # the old content, even if overwritten
            else:
                assert plan.new[base + src] == expert and src in received
                after[base + dst] = received[src]
    return after


def _check_plan(plan: MovePlan, old: list[int], new: list[int], ranks: int, per_node=None) -> None:
    slots = len(old) // ranks
    assert plan.old == tuple(old) and plan.new == tuple(new)
    after = _simulate(plan)
    for p, n in enumerate(new):
        if n >= 0:  # the slot ends up with content that was expert n before the move
            assert after[p][0] == "old slot" and old[after[p][1]] == n, (p, after[p])
        else:  # unused slots are left alone
            assert after[p] == ("old slot", p)
    pairs_sent, pairs_recv = [], []
    for r in range(ranks):
        local_old, local_new = old[r * slots : (r + 1) * slots], new[r * slots : (r + 1) * slots]
        assert plan.keep[r] == tuple(
            s for s in range(slots) if local_new[s] >= 0 and local_new[s] == local_old[s]
        )
        changed = [s for s in range(slots) if local_new[s] >= 0 and local_new[s] != local_old[s]]
        dsts = [d for *_, d in plan.recvs[r]] + [d for _, d in plan.copies[r]]
        assert sorted(dsts) == changed  # every changed slot is written exactly once
        got = [local_new[d] for *_, d in plan.recvs[r]]
        assert len(set(got)) == len(got)  # each expert received at most once
        assert not set(got) & set(local_old)  # never an expert the rank holds already
        for src_rank, src_slot, dst in plan.recvs[r]:
            assert old[src_rank * slots + src_slot] == local_new[dst]  # the sender holds it
            if per_node is not None:
                holders = {q // slots for q, e in enumerate(old) if e == local_new[dst]}
                if any(h // per_node == r // per_node for h in holders):
                    assert src_rank // per_node == r // per_node
            pairs_recv.append((src_rank, r, src_slot))
        pairs_sent += [(r, dst_rank, src_slot) for dst_rank, src_slot in plan.sends[r]]
    # Sends and receives match, and between two ranks come in the same order.
    for r in range(ranks):  # sends are sorted by receiver, receives by destination slot
        assert [d for d, _ in plan.sends[r]] == sorted(d for d, _ in plan.sends[r])
        assert [d for *_, d in plan.recvs[r]] == sorted(d for *_, d in plan.recvs[r])
    for a in range(ranks):
        for b in range(ranks):
            sent = [s for (x, y, s) in pairs_sent if (x, y) == (a, b)]
            recv = [s for (x, y, s) in pairs_recv if (x, y) == (a, b)]
            assert sent == recv, (a, b, sent, recv)
    assert plan.num_transfers == _lower_bound(old, new, ranks)


@st.composite
def placements(draw: st.DrawFn) -> tuple[list[int], list[int], int, int | None]:
    ranks = draw(st.integers(1, 5))
    slots = draw(st.integers(1, 5))
    total = ranks * slots
    experts = draw(st.integers(1, total + 2))
    old = draw(st.lists(st.integers(-1, experts - 1), min_size=total, max_size=total))
    present = sorted({e for e in old if e >= 0}) or [-1]
    new = draw(st.lists(st.sampled_from([*present, -1]), min_size=total, max_size=total))
    per_node = draw(st.one_of(st.none(), st.integers(1, ranks)))
    return old, new, ranks, per_node


@settings(max_examples=300, deadline=None)
@given(placements(), st.integers(1, 10**6))
def test_random_plans_follow_the_rules_and_meet_the_bound(case: tuple, expert_bytes: int) -> None:
    old, new, ranks, per_node = case
    plan = plan_moves(old, new, ranks, ranks_per_node=per_node)
    _check_plan(plan, old, new, ranks, per_node)
    bound = _lower_bound(old, new, ranks) * expert_bytes
    assert plan.bytes(expert_bytes) == bound == min_move_bytes(old, new, ranks, expert_bytes)
    assert plan_moves(old, new, ranks, ranks_per_node=per_node) == plan  # deterministic


def _fewest_max_sends(old: list[int], new: list[int], ranks: int, per_node=None) -> int | None:
    """Brute force: the smallest possible largest number of sends of one rank, over every
    choice of a sender (a holder, on the receiver's node if one is there) for every (rank,
    expert) receive; None when there are too many choices to try."""
    slots = len(old) // ranks
    options = []
    for r in range(ranks):
        have = set(old[r * slots : (r + 1) * slots])
        for e in sorted({e for e in new[r * slots : (r + 1) * slots] if e >= 0} - have):
            holders = sorted({q // slots for q, x in enumerate(old) if x == e})
            if per_node is not None:
                near = [h for h in holders if h // per_node == r // per_node]
                holders = near or holders
            options.append(holders)
    if not options:
        return 0
    choices = 1
    for o in options:
        choices *= len(o)
    if choices > 20000:
        return None
    return min(max(pick.count(h) for h in range(ranks)) for pick in itertools.product(*options))


@settings(max_examples=300, deadline=None)
@given(placements())
def test_busiest_sender_sends_as_few_as_possible(case: tuple) -> None:
    old, new, ranks, per_node = case
    best = _fewest_max_sends(old, new, ranks, per_node)
    if best is not None:
        plan = plan_moves(old, new, ranks, ranks_per_node=per_node)
        assert max(len(s) for s in plan.sends) == best


def test_forced_senders_count_before_free_choices() -> None:
    # Rank 0 alone holds experts 1 and 2 (sends both to rank 2); expert 0 is on ranks 0 and 1.
    # Choosing in receiver order by "sent least so far", rank 0 would send expert 0 as well.
    old = [0, 1, 2, 0, 3, 4, 5, 6, 7]
    new = [0, 1, 2, 0, 3, 4, 0, 1, 2]
    plan = plan_moves(old, new, 3)
    assert [len(s) for s in plan.sends] == [2, 1, 0]
    assert plan.recvs[2] == ((1, 0, 0), (0, 1, 1), (0, 2, 2))


def test_senders_are_spread_over_the_holders() -> None:
    # Expert 0 is on ranks 0 and 1; ranks 2..7 all need it: three sends each.
    old = [0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    new = [0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10, 0, 12, 0, 14]
    plan = plan_moves(old, new, 8)
    assert [len(s) for s in plan.sends] == [3, 3, 0, 0, 0, 0, 0, 0]


def test_same_node_sender_preferred() -> None:
    # Expert 0 on ranks 0 and 3 (nodes of two ranks): rank 1 takes it from 0, rank 2 from 3.
    old = [0, 1, 2, 3, 4, 5, 0, 7]
    new = [0, 1, 0, 3, 0, 5, 0, 7]
    plan = plan_moves(old, new, 4, ranks_per_node=2)
    assert plan.recvs[1] == ((0, 0, 0),) and plan.recvs[2] == ((3, 0, 0),)


def test_layers() -> None:
    old = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    new = torch.tensor([[1, 0, 3, 2], [0, 1, 2, 3]])  # layer 0 swaps locally: 0 bytes
    plans = plan_moves(old, new, 2)
    assert [p.layer for p in plans] == [0, 1]
    assert plans[0] == plan_moves(old[0], new[0], 2)
    assert min_move_bytes(old, new, 2, 5) == sum(p.bytes(5) for p in plans) == 20


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"layer 1: expert 7 \(new slot 2\)"):
        plan_moves([[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3], [0, 1, 7, 3]], 2)
    with pytest.raises(ValueError, match=r"layer 1: expert 7"):
        min_move_bytes([[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3], [0, 1, 7, 3]], 2, 1)
    with pytest.raises(ValueError, match="same shape"):
        plan_moves([0, 1, 2, 3], [[0, 1, 2, 3]], 2)
    with pytest.raises(ValueError, match="num_ranks=3"):
        plan_moves([0, 1, 2, 3], [0, 1, 2, 3], 3)
    with pytest.raises(TypeError, match="old_phy2log"):
        plan_moves([0.0, 1.0], [0, 1], 1)
    with pytest.raises(ValueError, match=r"new_phy2log.*-2"):
        plan_moves([0, 1], [0, -2], 1)
    with pytest.raises(ValueError, match="num_ranks"):
        plan_moves([0, 1], [0, 1], 0)
    with pytest.raises(TypeError, match="num_ranks"):
        plan_moves([0, 1], [0, 1], True)
    with pytest.raises(ValueError, match="ranks_per_node"):
        plan_moves([0, 1], [0, 1], 2, ranks_per_node=0)
    with pytest.raises(ValueError, match="expert_bytes"):
        min_move_bytes([0, 1], [1, 0], 2, 0)
    with pytest.raises(TypeError, match="expert_bytes"):
        plan_moves([0, 1], [1, 0], 2).bytes(1.5)
