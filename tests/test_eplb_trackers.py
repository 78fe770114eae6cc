"""Load trackers against plain-loop references."""

from __future__ import annotations

import pytest
import torch

from eplb import EWMATracker, StageTracker, WindowTracker


def random_counts(steps: int, shape=(3, 5), seed: int = 0, floats: bool = False):
    gen = torch.Generator().manual_seed(seed)
    counts = [torch.randint(0, 1000, shape, generator=gen) for _ in range(steps)]
    if floats:
        counts = [
            c.double() * torch.rand(shape, generator=gen, dtype=torch.float64) for c in counts
        ]
    return counts


def window_reference(history: list[torch.Tensor], window: int, mean: bool) -> list[list[float]]:
    """Sum (or mean) of the last ``window`` entries, element by element in plain Python."""
    kept = history[-window:]
    rows, cols = kept[0].shape
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            total = 0.0
            for c in kept:
                total += float(c[i, j])
            row.append(total / len(kept) if mean else total)
        out.append(row)
    return out


@pytest.mark.parametrize("window", [1, 3, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_window_integer_counts_exact(window: int, reduction: str) -> None:
    tracker = WindowTracker(window, reduction=reduction)
    history = []
    # 2 * window + 2 steps: before the buffer fills, exactly full, and wrapped twice.
    for c in random_counts(2 * window + 2, seed=window):
        tracker.update(c)
        history.append(c)
        load = tracker.load()
        assert load.dtype == torch.float64 and load.shape == (3, 5)
        assert load.tolist() == window_reference(history, window, reduction == "mean")
    assert tracker.num_updates == 2 * window + 2


def test_window_float_counts() -> None:
    tracker = WindowTracker(4)
    history = []
    for c in random_counts(11, seed=1, floats=True):
        tracker.update(c)
        history.append(c)
        want = torch.tensor(window_reference(history, 4, True), dtype=torch.float64)
        torch.testing.assert_close(tracker.load(), want, rtol=1e-13, atol=0)


def test_window_float_load_of_zeroed_expert_is_exactly_zero() -> None:
    # A running float sum would leave a rounding residue (possibly negative) once the expert's
    # counts leave the window; the buffer sum does not.
    tracker = WindowTracker(3, reduction="sum")
    for value in (0.1, 0.7, 1e16 / 3, 0.0, 0.0, 0.0):
        tracker.update(torch.tensor([[value, 1.0]], dtype=torch.float64))
    assert tracker.load().tolist() == [[0.0, 3.0]]


def test_window_keeps_large_integer_sums_exact() -> None:
    tracker = WindowTracker(2, reduction="sum")
    big = 2**52 + 1  # not representable as float32 and at the edge of float64
    tracker.update(torch.tensor([[big]], dtype=torch.int64))
    tracker.update(torch.tensor([[1]], dtype=torch.int64))
    tracker.update(torch.tensor([[2]], dtype=torch.int64))
    assert tracker.load().tolist() == [[3.0]]


def test_ewma_against_loop() -> None:
    alpha = 0.3
    tracker = EWMATracker(alpha)
    avg = None
    for c in random_counts(9, seed=2):
        tracker.update(c)
        x = c.double()
        avg = x.clone() if avg is None else alpha * x + (1 - alpha) * avg
        torch.testing.assert_close(tracker.load(), avg, rtol=1e-14, atol=0)


def test_ewma_first_update_is_the_counts_and_alpha_one_is_last_counts() -> None:
    tracker = EWMATracker(0.25)
    tracker.update(torch.tensor([[4, 8]]))
    assert tracker.load().tolist() == [[4.0, 8.0]]  # no bias towards zero
    last = EWMATracker(1.0)
    last.update(torch.tensor([[float("inf"), 1.0]]))
    for c in random_counts(4, shape=(1, 2), seed=3):
        last.update(c)
        assert last.load().tolist() == c.double().tolist()


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_ewma_alpha_validated(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        EWMATracker(alpha)
    with pytest.raises(TypeError, match="alpha"):
        EWMATracker(True)


def test_stage_tracker_keeps_stages_apart() -> None:
    tracker = StageTracker(prefill=WindowTracker(2, reduction="sum"), decode=EWMATracker(0.5))
    prefill = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), torch.tensor([[5, 6]])]
    decode = [torch.tensor([[10, 0]]), torch.tensor([[0, 10]])]
    tracker.update(prefill[0], stage="prefill")
    tracker.update(decode[0], stage="decode")
    tracker.update(prefill[1], stage="prefill")
    tracker.update(decode[1], stage="decode")
    tracker.update(prefill[2], stage="prefill")
    assert tracker.load(stage="prefill").tolist() == [[8.0, 10.0]]  # last two prefill steps
    assert tracker.load(stage="decode").tolist() == [[5.0, 5.0]]
    assert tracker.load().tolist() == [[13.0, 15.0]]
    assert tracker.num_updates == 5
    with pytest.raises(ValueError, match="stage"):
        tracker.update(prefill[0], stage="train")
    with pytest.raises(ValueError, match="stage"):
        tracker.load(stage="both")


def test_stage_tracker_with_one_stage_seen() -> None:
    tracker = StageTracker()
    with pytest.raises(ValueError, match="no counts"):
        tracker.load()
    tracker.update(torch.tensor([[2, 4]]), stage="decode")
    assert tracker.load().tolist() == [[2.0, 4.0]]
    with pytest.raises(ValueError, match="no counts"):
        tracker.load(stage="prefill")


@pytest.mark.parametrize(
    "make",
    [
        lambda: WindowTracker(3),
        lambda: WindowTracker(4, reduction="sum"),
        lambda: EWMATracker(0.2),
        lambda: StageTracker(prefill=WindowTracker(2), decode=EWMATracker(0.1)),
    ],
)
@pytest.mark.parametrize("floats", [False, True])
def test_state_round_trip_resumes(make, floats: bool, tmp_path) -> None:
    counts = random_counts(10, seed=4, floats=floats)
    stages = ["prefill", "decode"] * 5

    def feed(tracker, items):
        for c, stage in items:
            if isinstance(tracker, StageTracker):
                tracker.update(c, stage=stage)
            else:
                tracker.update(c)

    items = list(zip(counts, stages, strict=True))
    straight = make()
    feed(straight, items)

    first = make()
    feed(first, items[:6])
    torch.save(first.state_dict(), tmp_path / "tracker.pt")
    # The state is a copy: updates after state_dict() do not leak into it.
    in_memory = first.state_dict()
    feed(first, [(c + 999, "decode") for c in counts[:2]])
    resumed = make()
    resumed.load_state_dict(in_memory)
    feed(resumed, items[6:])
    assert torch.equal(resumed.load(), straight.load())
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt"))
    feed(resumed, items[6:])
    assert torch.equal(resumed.load(), straight.load())
    if isinstance(straight, StageTracker):
        for stage in ("prefill", "decode"):
            assert torch.equal(resumed.load(stage=stage), straight.load(stage=stage))
    assert resumed.num_updates == straight.num_updates


def test_state_of_other_settings_rejected() -> None:
    tracker = WindowTracker(3)
    tracker.update(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="window"):
        WindowTracker(4).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        EWMATracker(0.5).load_state_dict(tracker.state_dict() | {"kind": "ewma"})
    with pytest.raises(ValueError, match="'window'"):
        EWMATracker(0.5).load_state_dict(tracker.state_dict())
    bad = tracker.state_dict()
    bad["buffer"] = bad["buffer"][:2]
    with pytest.raises(ValueError, match="buffer"):
        WindowTracker(3).load_state_dict(bad)


def test_empty_state_round_trip_and_reset() -> None:
    tracker = WindowTracker(2)
    other = WindowTracker(2)
    other.load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="no counts"):
        other.load()
    other.update(torch.tensor([[1.5]]))
    other.reset()
    assert other.num_updates == 0 and other.shape is None
    other.update(torch.tensor([[7]]))  # after a reset the kind may change
    assert other.load().tolist() == [[7.0]]


def test_bad_counts_rejected() -> None:
    tracker = WindowTracker(2)
    with pytest.raises(TypeError, match="numbers"):
        tracker.update("1 2")
    with pytest.raises(TypeError, match="bool"):
        tracker.update(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        tracker.update(torch.ones(4))
    tracker.update(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        tracker.update(torch.ones(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="kind"):
        tracker.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="window"):
        WindowTracker(0)
    with pytest.raises(ValueError, match="reduction"):
        WindowTracker(2, reduction="max")


def test_ewma_accepts_mixed_int_and_float() -> None:
    tracker = EWMATracker(0.5)
    tracker.update(torch.tensor([[2]], dtype=torch.int32))
    tracker.update(torch.tensor([[4.0]]))
    assert tracker.load().tolist() == [[3.0]]


def test_load_is_a_copy() -> None:
    for tracker in (WindowTracker(2, reduction="sum"), EWMATracker(0.5)):
        tracker.update(torch.tensor([[1, 2]]))
        tracker.load().add_(100)
        assert tracker.load().tolist() == [[1.0, 2.0]]


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_state_on_the_device_of_the_counts(reduction: str) -> None:
    counts = random_counts(5, seed=5)
    for make in (lambda: WindowTracker(3, reduction=reduction), lambda: EWMATracker(0.5)):
        gpu, cpu = make(), make()
        for c in counts:
            gpu.update(c.cuda())
            cpu.update(c)
            load = gpu.load()
            assert load.is_cuda and load.dtype == torch.float64
            if reduction == "sum" and isinstance(gpu, WindowTracker):
                assert torch.equal(load.cpu(), cpu.load())  # integer sums: exact
            else:  # CUDA divides by a scalar through its reciprocal: last-bit differences
                torch.testing.assert_close(load.cpu(), cpu.load(), rtol=1e-15, atol=0)
