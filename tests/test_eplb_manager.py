"""RebalanceManager decisions on scripted load sequences."""

from __future__ import annotations

import logging

import pytest
import torch

import eplb
import eplb.manager as manager_module
from eplb import EWMATracker, Rebalance, RebalanceManager, StageTracker, WindowTracker

# 2 layers, 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs (DeepSeek's README example).
HOT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
LAYOUT = (16, 4, 2, 8)  # num_replicas, num_groups, num_nodes, num_gpus
UNIFORM = torch.full((2, 12), 50)


def plain_balancedness(load: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> list[float]:
    """Mean / max GPU load per layer, a copy carrying load / copies, in plain Python loops."""
    out = []
    for weights, row in zip(load.tolist(), phy2log.tolist(), strict=True):
        copies = [row.count(e) for e in range(len(weights))]
        per = len(row) // num_gpus
        gpus = [
            sum(weights[e] / copies[e] for e in row[g * per : (g + 1) * per])
            for g in range(num_gpus)
        ]
        out.append(sum(gpus) / num_gpus / max(gpus))
    return out


def identity(num_layers: int = 2) -> torch.Tensor:
    return (torch.arange(16) % 12).repeat(num_layers, 1)


def even() -> torch.Tensor:
    """GPU g holds expert g alone (50 tokens of UNIFORM) and one of two copies of expert
    8 + g // 2 (25): every GPU carries 75, balancedness 1 under UNIFORM."""
    return torch.tensor([[g, 8 + g // 2][i] for g in range(8) for i in range(2)]).repeat(2, 1)


def make(**kwargs) -> RebalanceManager:
    kwargs.setdefault("tracker", EWMATracker(1.0))
    kwargs.setdefault("interval", 4)
    initial = kwargs.pop("initial", identity())
    return RebalanceManager(initial, *LAYOUT, **kwargs)


def kinds(manager: RebalanceManager) -> list[tuple[int, str]]:
    """(step, kind) of the events, without the layout report of the first counts."""
    return [(e.step, e.kind) for e in manager.events if e.kind != "layout"]


def test_fixed_interval_proposes_validated_rebalance_and_commit_switches_routing() -> None:
    seen = []
    manager = make(on_event=seen.append)
    initial = manager.phy2log.clone()
    for _ in range(3):
        assert manager.step(HOT) is None
    rebalance = manager.step(HOT)
    assert isinstance(rebalance, Rebalance) and rebalance.step == 4
    assert manager.pending is rebalance
    assert torch.equal(manager.phy2log, initial)  # routing unchanged until the commit

    # The proposal is rebalance_experts from the placement in use, row by row where better.
    new = eplb.rebalance_experts(HOT, *LAYOUT, policy="balanced", old_phy2log=initial)[0]
    before = plain_balancedness(HOT, initial, 8)
    after = plain_balancedness(HOT, new, 8)
    for layer in range(2):
        want = new[layer] if after[layer] > before[layer] else initial[layer]
        assert torch.equal(rebalance.new_phy2log[layer], want)
    assert torch.equal(rebalance.old_phy2log, initial)
    assert torch.equal(rebalance.changed, rebalance.new_phy2log != initial)
    assert rebalance.num_changed.tolist() == rebalance.changed.sum(1).tolist()
    assert [s.tolist() for s in rebalance.changed_slots] == [
        [p for p in range(16) if rebalance.changed[layer, p]] for layer in range(2)
    ]
    assert rebalance.balancedness_before.tolist() == pytest.approx(before, rel=1e-12)
    assert rebalance.balancedness_after.tolist() == pytest.approx(
        plain_balancedness(HOT, rebalance.new_phy2log, 8), rel=1e-12
    )
    assert (rebalance.balancedness_after > rebalance.balancedness_before).all()
    assert eplb.count_duplicate_rows(rebalance.new_phy2log, 8) == 0
    log2phy, logcnt = eplb.phy2log_to_log2phy(rebalance.new_phy2log, 12)
    assert torch.equal(rebalance.log2phy, log2phy) and torch.equal(rebalance.logcnt, logcnt)

    assert manager.commit(rebalance) is True
    assert torch.equal(manager.phy2log, rebalance.new_phy2log)
    assert torch.equal(manager.logcnt, logcnt)
    assert manager.pending is None
    # Same load again: nothing improves, decisions every 4 steps keep the placement.
    for _ in range(8):
        assert manager.step(HOT) is None
    assert kinds(manager) == [(4, "rebalance"), (4, "commit"), (8, "keep"), (12, "keep")]
    assert seen == manager.events
    event = manager.events[0]
    assert event.rebalance_id == rebalance.id and event.interval == 4
    assert event.balancedness_before == pytest.approx(sum(before) / 2, rel=1e-12)
    assert event.num_changed == int(rebalance.changed.sum())


def test_threshold_skips_when_the_placement_in_use_is_balanced_enough() -> None:
    assert plain_balancedness(UNIFORM, even(), 8) == [1.0, 1.0]
    manager = make(threshold=0.9, initial=even())
    for _ in range(4):
        assert manager.step(UNIFORM) is None
    assert kinds(manager) == [(4, "skip_threshold")]
    assert manager.events[0].balancedness_before == 1.0
    # Skewed load: the same placement is now below the threshold, so the next decision acts.
    for _ in range(4):
        result = manager.step(HOT)
    assert isinstance(result, Rebalance)
    assert sum(plain_balancedness(HOT, even(), 8)) / 2 < 0.9


def test_imbalance_is_measured_on_the_placement_in_use_not_raw_counts() -> None:
    # Raw counts are very uneven, but a placement giving each GPU one hot and one cold expert
    # is perfectly balanced: the threshold must see that and skip.
    load = torch.tensor([[100, 100, 100, 100, 0, 0, 0, 0]])
    placement = torch.tensor([[0, 4, 1, 5, 2, 6, 3, 7]])
    manager = RebalanceManager(
        placement, 8, 1, 1, 4, tracker=EWMATracker(1.0), interval=1, threshold=0.99
    )
    assert manager.step(load) is None
    assert kinds(manager) == [(1, "skip_threshold")]
    assert eplb.coefficient_of_variation(load.double())[0] > 0.9


def test_adaptive_interval_doubles_when_stable_and_halves_when_imbalance_grows() -> None:
    manager = make(adaptive=True, min_interval=2, max_interval=16)
    decisions = []
    shifted = HOT.flip(1)  # other experts become hot
    for step in range(1, 61):
        counts = HOT if step <= 36 else shifted
        result = manager.step(counts)
        if result is not None:
            manager.commit(result)
    for event in manager.events:
        if event.kind in ("rebalance", "keep", "skip_threshold"):
            decisions.append((event.step, event.kind, event.interval))
    # 4: first decision (no reference yet), interval stays 4; then stable -> 8 -> 16 -> capped.
    # At 44 the load has shifted: imbalance of the placement in use grew -> halve to 8, and the
    # rebalance fixes it; at 52 stable again -> 16.
    assert decisions == [
        (4, "rebalance", 4),
        (8, "keep", 8),
        (16, "keep", 16),
        (32, "keep", 16),
        (48, "rebalance", 8),
        (56, "keep", 16),
    ]
    assert manager.interval == 16


def test_adaptive_interval_bounds_and_factors_validated() -> None:
    with pytest.raises(ValueError, match="min_interval"):
        make(adaptive=True, min_interval=8, interval=4)
    with pytest.raises(ValueError, match="stable_factor"):
        make(grow_factor=1.1, stable_factor=1.2)
    with pytest.raises(ValueError, match="stable_factor"):
        make(stable_factor=0.5)


@pytest.mark.parametrize(
    "result",
    [
        "raise",
        "missing_expert",
        "duplicate_on_gpu",
        "wrong_shape",
        "out_of_range",
        "float",
    ],
)
def test_invalid_balancer_result_falls_back_to_the_placement_in_use(
    result: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(weight, *args, **kwargs):
        good = identity()
        if result == "raise":
            raise RuntimeError("solver exploded")
        if result == "missing_expert":
            good[1, 5] = 0  # expert 5 has one copy in slot 5 only: now none
        elif result == "duplicate_on_gpu":
            good[0, 1] = good[0, 0]  # GPU 0 holds expert 0 twice
        elif result == "wrong_shape":
            good = good[:, :8]
        elif result == "out_of_range":
            good[0, 3] = 12
        else:
            good = good.double()
        return good, None, None

    monkeypatch.setattr(manager_module, "rebalance_experts", broken)
    manager = make()
    with caplog.at_level(logging.WARNING, logger="eplb.manager"):
        for _ in range(4):
            assert manager.step(HOT) is None
    assert kinds(manager) == [(4, "fallback")]
    assert torch.equal(manager.phy2log, identity())
    assert manager.pending is None
    assert any("fallback" in r.getMessage() for r in caplog.records)


def test_failure_without_initial_placement_keeps_round_robin(monkeypatch) -> None:
    monkeypatch.setattr(
        manager_module, "rebalance_experts", lambda *a, **k: (_ for _ in ()).throw(ValueError("x"))
    )
    manager = RebalanceManager(None, *LAYOUT, tracker=EWMATracker(1.0), interval=2)
    assert manager.phy2log is None
    manager.step(HOT)
    manager.step(HOT)
    assert kinds(manager) == [(2, "fallback")]
    assert manager.phy2log.tolist() == [[p % 12 for p in range(16)]] * 2


def test_non_finite_statistics_fall_back_then_recover() -> None:
    manager = make(tracker=WindowTracker(2))
    hot = HOT.double()
    nan = hot.clone()
    nan[0, 3] = float("nan")
    assert manager.step(hot) is None
    assert manager.step(hot) is None
    assert manager.step(nan) is None
    assert manager.step(hot) is None  # decision: the window holds the NaN step
    assert kinds(manager) == [(4, "fallback")]
    assert "tracked load must be finite, got nan" in manager.events[0].reason
    for _ in range(3):
        manager.step(hot)
    assert isinstance(manager.step(hot), Rebalance)  # NaN left the window


def test_bad_counts_are_reported_not_raised() -> None:
    manager = make(interval=100)
    assert manager.step(torch.ones(3, 12)) is None  # wrong layer count
    assert manager.step("counts") is None  # not numbers
    assert manager.step(torch.ones(2, 12, dtype=torch.bool)) is None
    assert manager.step(torch.ones(0, 12)) is None
    manager.step(HOT)
    assert manager.step(torch.ones(2, 11)) is None  # expert count changed
    assert [k for _, k in kinds(manager)] == ["bad_counts"] * 5
    assert manager.tracker.num_updates == 1


def test_watchdog_rolls_back_an_uncommitted_rebalance_after_steps() -> None:
    manager = make(watchdog_steps=2)
    for _ in range(4):
        rebalance = manager.step(HOT)
    assert rebalance is not None
    for _ in range(2):  # steps 5, 6: still within 2 steps
        manager.step(HOT)
        assert manager.pending is rebalance
    manager.step(HOT)  # step 7: 3 steps without a commit
    assert manager.pending is None
    assert kinds(manager)[-1] == (7, "rollback")
    assert torch.equal(manager.phy2log, identity())  # routing never left the old placement
    # A late commit is refused and reported: the caller must restore the old weights.
    assert manager.commit(rebalance) is False
    assert kinds(manager)[-1] == (7, "stale_commit")
    assert torch.equal(manager.phy2log, identity())
    # The next decision point (step 8) proposes again.
    again = manager.step(HOT)
    assert again is not None and again.id == rebalance.id + 1
    assert torch.equal(again.new_phy2log, rebalance.new_phy2log)


def test_watchdog_rolls_back_after_seconds() -> None:
    now = [100.0]
    manager = make(watchdog_steps=None, watchdog_seconds=30.0, clock=lambda: now[0])
    for _ in range(4):
        rebalance = manager.step(HOT)
    now[0] += 29.0
    manager.step(HOT)
    assert manager.pending is rebalance
    now[0] += 2.0
    manager.step(HOT)
    assert manager.pending is None and kinds(manager)[-1] == (6, "rollback")


def test_decisions_wait_while_a_rebalance_is_pending_and_cancel() -> None:
    manager = make(watchdog_steps=None, watchdog_seconds=None)
    for _ in range(4):
        rebalance = manager.step(HOT)
    for _ in range(4):
        assert manager.step(HOT) is None
    assert kinds(manager)[-1] == (8, "skip_pending")
    assert manager.cancel(rebalance, "copy failed") is True
    assert manager.cancel(rebalance) is False
    assert kinds(manager)[-1] == (8, "cancel")
    assert manager.commit(rebalance) is False
    with pytest.raises(TypeError, match="Rebalance"):
        manager.commit("rebalance 0")


def test_restart_from_state_resumes_identically(tmp_path) -> None:
    def counts(step: int) -> torch.Tensor:
        # Hot experts drift every few steps, and every step adds noise: decisions depend on the
        # whole window, so a resumed manager must have restored it.
        gen = torch.Generator().manual_seed(step)
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(step // 6))
        return HOT[:, perm] + torch.randint(0, 60, (2, 12), generator=gen)

    def run(manager: RebalanceManager, steps: range) -> list:
        out = []
        for step in steps:
            result = manager.step(counts(step))
            if result is not None:
                out.append((step, result.new_phy2log.tolist()))
                manager.commit(result)
        return out

    def fresh() -> RebalanceManager:
        return make(tracker=WindowTracker(8), adaptive=True, min_interval=2, interval=3)

    straight = fresh()
    want = run(straight, range(40))

    first = fresh()
    head = run(first, range(25))
    torch.save(first.state_dict(), tmp_path / "manager.pt")
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "manager.pt"))
    assert resumed.step_count == 25 and resumed.interval == first.interval
    assert torch.equal(resumed.phy2log, first.phy2log)
    tail = run(resumed, range(25, 40))
    assert len(head) >= 2 and len(tail) >= 2
    assert head + tail == want

    def decisions(manager: RebalanceManager) -> list[tuple[int, str, int | None]]:
        return [
            (e.step, e.kind, e.interval)
            for e in manager.events
            if e.step > 25 and e.kind != "restore"
        ]

    assert decisions(resumed) == decisions(straight)
    assert torch.equal(resumed.phy2log, straight.phy2log)
    assert resumed.interval == straight.interval
    assert kinds(resumed)[0] == (25, "restore")


def test_state_of_another_layout_rejected() -> None:
    manager = make()
    other = RebalanceManager(identity(), 16, 4, 2, 4)
    with pytest.raises(ValueError, match="num_gpus"):
        other.load_state_dict(manager.state_dict())
    with pytest.raises(ValueError, match="version"):
        manager.load_state_dict({"step": 3})


def test_stage_tracker_drives_decisions_with_the_chosen_stage() -> None:
    tracker = StageTracker(prefill=EWMATracker(1.0), decode=EWMATracker(1.0))
    manager = make(tracker=tracker, load_stage="decode", threshold=0.99, interval=2, initial=even())
    manager.step(HOT, stage="prefill")  # skewed prefill is not what decisions look at
    manager.step(UNIFORM, stage="decode")
    assert kinds(manager) == [(2, "skip_threshold")]
    manager.step(HOT)  # a StageTracker needs the stage
    assert kinds(manager)[-1] == (3, "bad_counts")
    with pytest.raises(ValueError, match="StageTracker"):
        make(load_stage="decode")


def test_deepseek_policy() -> None:
    manager = make(policy="deepseek")
    for _ in range(4):
        rebalance = manager.step(HOT)
    assert rebalance is not None
    new = eplb.rebalance_experts(HOT, *LAYOUT)[0]
    improved = rebalance.balancedness_after > rebalance.balancedness_before
    assert torch.equal(rebalance.new_phy2log[improved], new[improved])


def test_callback_errors_do_not_reach_the_loop(caplog) -> None:
    def callback(event):
        raise RuntimeError("logger down")

    manager = make(on_event=callback)
    with caplog.at_level(logging.WARNING, logger="eplb.manager"):
        for _ in range(4):
            result = manager.step(HOT)
    assert result is not None
    assert any("callback failed" in r.getMessage() for r in caplog.records)


def test_layout_report_event_on_first_counts() -> None:
    # 12 experts, 4 groups, 3 nodes: groups not divisible by nodes -> warning event.
    manager = RebalanceManager(identity(), 16, 4, 1, 8, tracker=EWMATracker(1.0))
    manager.step(HOT)
    assert manager.events == []
    manager = RebalanceManager(None, 24, 4, 3, 6, tracker=EWMATracker(1.0), interval=1)
    manager.step(HOT)
    assert (manager.events[0].step, manager.events[0].kind) == (1, "layout")
    assert "hierarchical" in manager.events[0].reason


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        RebalanceManager(None, 15, 4, 2, 8)
    with pytest.raises(ValueError, match="slots"):
        RebalanceManager(identity()[:, :8], 16, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[L, R\]"):
        RebalanceManager(torch.arange(16), 16, 4, 2, 8)
    with pytest.raises(TypeError, match="dtype"):
        RebalanceManager(identity().double(), 16, 4, 2, 8)
    with pytest.raises(ValueError, match="policy"):
        make(policy="greedy")
    with pytest.raises(ValueError, match="threshold"):
        make(threshold=1.5)
    with pytest.raises(TypeError, match="tracker"):
        make(tracker="ewma")
    with pytest.raises(ValueError, match="interval"):
        make(interval=0)
    with pytest.raises(ValueError, match="watchdog_seconds"):
        make(watchdog_seconds=-1.0)


@pytest.mark.gpu
def test_no_host_sync_between_decision_points() -> None:
    manager = make(tracker=WindowTracker(4), interval=5)
    counts = HOT.cuda()
    manager.step(counts)  # first counts: shapes and state allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # steps 2-4: tracker updates only
            assert manager.step(counts) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert manager.step(counts) is not None  # step 5 reads the load (syncs, allowed)
    assert not [e for e in manager.events if e.kind in ("bad_counts", "error")]
