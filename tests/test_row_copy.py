"""eplb.row_copy: the one-launch row copies of expert moves against torch's own copies (GPU),
and its argument checks (any CUDA build, no GPU needed: they run before any CUDA call)."""

from __future__ import annotations

import random

import pytest
import torch

from eplb import _C, row_copy

needs_kernel = pytest.mark.skipif(not row_copy.available(), reason="eplb._C built without CUDA")


@needs_kernel
@pytest.mark.parametrize(
    ("src", "dst", "nbytes", "chunk", "why"),
    [
        ([1], [2, 3], [4], 16, "same length"),
        ([1], [2], [-1], 16, "bytes must be >= 0"),
        ([0], [2], [4], 16, "null address"),
        ([1], [2], [4], 24, "multiple of 16"),
        ([1], [2], [4], 0, "multiple of 16"),
        ([1], [2], [4], -16, "multiple of 16"),
    ],
)
def test_bad_arguments_raise_before_any_cuda_call(src, dst, nbytes, chunk, why) -> None:
    with pytest.raises(ValueError, match=why):
        _C.copy_rows_cuda(0, src, dst, nbytes, 1, chunk, 0)


@needs_kernel
@pytest.mark.parametrize("per_sm", [0, -1])
def test_blocks_per_sm_must_be_positive(per_sm: int) -> None:
    with pytest.raises(ValueError, match="blocks_per_sm"):
        _C.copy_rows_cuda(0, [1], [2], [4], per_sm, 16, 0)


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "cols", "rank", "state", "why"),
    [
        (2, 4, 0, 0, "needs its state"),
        (0, 4, 0, 8, "table is empty"),
        (2, 0, 0, 8, "table is empty"),
        (2, 4, 2, 8, "not a row"),
        (2, 4, -1, 8, "not a row"),
    ],
)
def test_bad_gates_raise_before_any_cuda_call(rows, cols, rank, state, why) -> None:
    with pytest.raises(ValueError, match=why):
        _C.copy_rows_cuda(0, [1], [2], [4], 1, 16, 0, 16, rows, cols, rank, state)


@needs_kernel
def test_closing_a_gate_without_state_raises() -> None:
    with pytest.raises(ValueError, match="null state"):
        _C.close_gate_cuda(0, 0)


@pytest.mark.parametrize(
    ("table", "rank", "error"),
    [
        ([[1, 2]], 0, TypeError),  # not a tensor
        (torch.ones(2, 3, dtype=torch.int32), 0, TypeError),
        (torch.ones(2, 3, dtype=torch.int64), 0, ValueError),  # on the CPU
    ],
)
def test_bad_gate_tables_are_refused(table, rank, error) -> None:
    with pytest.raises(error):
        row_copy.Gate(table, rank)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rank", "error"), [(2, ValueError), (-1, ValueError), (True, TypeError), (0.0, TypeError)]
)
def test_bad_gate_ranks_are_refused(rank, error) -> None:
    with pytest.raises(error, match="rank"):
        row_copy.Gate(torch.ones(2, 3, dtype=torch.int64, device="cuda"), rank)


@needs_kernel
def test_copy_rows_takes_only_a_gate_as_gate() -> None:
    with pytest.raises(TypeError, match="Gate"):
        row_copy.copy_rows(torch.device("cuda", 0), [1], [2], [16], gate=object())


def test_without_the_kernel_copy_rows_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_copy, "available", lambda: False)
    with pytest.raises(RuntimeError, match="without CUDA"):
        row_copy.copy_rows(torch.device("cuda", 0), [1], [2], [3])
    with pytest.raises(RuntimeError, match="without CUDA"):
        row_copy.own_stream(torch.device("cuda", 0))


def _random_copies(rng: random.Random, size: int, count: int, most: int) -> list[tuple]:
    """``count`` copies (source offset, destination offset, bytes) within ``size`` bytes whose
    destinations do not overlap each other; sizes and offsets of any alignment, some empty."""
    out, taken = [], []
    while len(out) < count:
        n = rng.choice([0, 1, 3, 15, 16, 17, 4096, 65536 + 8, rng.randrange(most)])
        at = rng.randrange(size - n) if n < size else 0
        if any(at < end and begin < at + n for begin, end in taken):
            continue
        taken.append((at, at + n))
        out.append((rng.randrange(size - n), at, n))
    return out


def _copy_case(count: int, seed: int, size: int = 4 << 20, most: int = 256 << 10) -> tuple:
    """(source, destination, its expected content after the copies, the copies' arguments
    ``(src, dst, nbytes)``): ``count`` random copies of at most ``most`` bytes within ``size``
    bytes on GPU 0 (more than one launch's 64 when count > 64), done by torch one by one for
    the expected content."""
    device = torch.device("cuda", 0)
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    out = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    want = out.clone()
    copies = _random_copies(random.Random(seed), size, count, most)
    for s, d, n in copies:
        want[d : d + n].copy_(src[s : s + n])
    args = (
        [src.data_ptr() + s for s, _, _ in copies],
        [out.data_ptr() + d for _, d, _ in copies],
        [n for _, _, n in copies],
    )
    return src, out, want, args


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 16), (3, 4096), row_copy.LOCAL, row_copy.PUSH])
@pytest.mark.parametrize("count", [1, 64, 150])
def test_copies_match_torch(shape: tuple[int, int], count: int) -> None:
    """Random copies from one buffer into another, more than one launch's 64 when count is
    150, against the same copies done by torch one by one."""
    _src, out, want, args = _copy_case(count, shape[1] * 1000 + count, 8 << 20, 2 << 20)
    row_copy.copy_rows(out.device, *args, shape)
    assert torch.equal(out, want)


@pytest.mark.gpu
def test_copies_follow_the_current_stream() -> None:
    """The copies are queued on the current stream: they see the work queued before them and
    the work queued after sees their result."""
    device = torch.device("cuda", 0)
    stream = torch.cuda.Stream(device)
    a = torch.zeros(1 << 20, dtype=torch.int32, device=device)
    b = torch.empty_like(a)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)
        a.fill_(7)
        row_copy.copy_rows(device, [a.data_ptr()], [b.data_ptr()], [a.numel() * 4], (1, 4096))
        c = b + 1
    stream.synchronize()
    assert bool((c == 8).all())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_copy_on_another_device_keeps_the_current_device() -> None:
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    a = torch.arange(1024, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    row_copy.copy_rows(device, [a.data_ptr()], [b.data_ptr()], [a.numel() * 4])
    torch.cuda.synchronize(device)
    assert torch.cuda.current_device() == 0
    assert torch.equal(a, b)
    elsewhere = row_copy.Gate(torch.ones(1, 1, dtype=torch.int64, device="cuda:0"), 0)
    with pytest.raises(ValueError, match="gate's table is on cuda:0"):
        row_copy.copy_rows(device, [a.data_ptr()], [b.data_ptr()], [4], gate=elsewhere)


# Tables of a 3-rank agreement as rank 1 sees it: (rows, whether the gate passes).
_TABLES = {
    "agreed": ([[1, 77, 1, 0]] * 3, True),
    "another fingerprint": ([[1, 77, 1, 0], [1, 77, 1, 0], [1, 78, 1, 0]], False),
    "another region": ([[1, 77, 1, 1], [1, 77, 1, 0], [1, 77, 1, 0]], False),
    "a rank missing": ([[1, 77, 1, 0], [1, 77, 1, 0], [0, 0, 0, 0]], False),
    "a rank failed": ([[0, 77, 1, 0], [1, 77, 1, 0], [1, 77, 1, 0]], False),
    "everyone failed": ([[0, 77, 1, 0]] * 3, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(_TABLES))
@pytest.mark.parametrize("count", [5, 150])
def test_a_gate_copies_all_or_nothing_by_its_table(case: str, count: int) -> None:
    """Every launch (three when count is 150) copies exactly when every row of the table
    equals the gate's own row and says ok; close() then finds the gate claimed, or closes it."""
    rows, passes = _TABLES[case]
    _src, out, want, args = _copy_case(count, seed=count)
    before = out.clone()
    gate = row_copy.Gate(torch.tensor(rows, dtype=torch.int64, device=out.device), 1)
    row_copy.copy_rows(out.device, *args, gate=gate)
    torch.cuda.synchronize()
    assert torch.equal(out, want if passes else before)
    assert gate.close() is not passes
    assert gate.state.tolist() == ([1, 1] if passes else [2, 0])


@pytest.mark.gpu
def test_a_gate_closed_before_its_table_agrees_never_copies() -> None:
    """The launch waits on its stream behind a long kernel, after which the table agrees;
    close() runs meanwhile on a stream of its own, so it closes the gate and the copies never
    run -- had close() waited for the launch, the launch would have claimed the gate."""
    _src, out, _want, args = _copy_case(40, seed=3)
    before = out.clone()
    table = torch.zeros(2, 3, dtype=torch.int64, device=out.device)
    table[:, 0] = 0  # its kernels loaded now: loading waits for the device's running work
    gate = row_copy.Gate(table, 0)
    stream = torch.cuda.Stream(out.device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s
        table.fill_(5)
        table[:, 0] = 1
        row_copy.copy_rows(out.device, *args, gate=gate)
    assert gate.close()
    torch.cuda.synchronize()
    assert torch.equal(out, before)
    assert gate.state.tolist() == [2, 0]


@pytest.mark.gpu
def test_an_own_stream_waits_for_no_other() -> None:
    """Work on it completes while the default stream (which a blocking stream would wait for)
    is still busy; torch's pooled streams are not handed it."""
    device = torch.device("cuda", 0)
    stream = row_copy.own_stream(device)
    assert stream.cuda_stream not in {torch.cuda.Stream(device).cuda_stream for _ in range(80)}
    y = torch.zeros(1024, device=device)
    y.fill_(1)  # loaded now: loading a kernel would wait for the sleep below
    torch.cuda._sleep(200_000_000)  # about 0.1 s on the default stream
    with torch.cuda.stream(stream):
        y.fill_(2)
    stream.synchronize()
    assert not torch.cuda.current_stream(device).query()  # still asleep
    torch.cuda.synchronize()
    assert bool((y == 2).all())


@pytest.mark.gpu
def test_a_claimed_gate_lets_later_launches_through() -> None:
    src, out, want, args = _copy_case(10, seed=4)
    gate = row_copy.Gate(torch.ones(2, 2, dtype=torch.int64, device=out.device), 1)
    row_copy.copy_rows(out.device, *args, gate=gate)
    torch.cuda.synchronize()
    assert not gate.close()  # claimed: stays open
    out2 = torch.zeros_like(out)
    row_copy.copy_rows(out.device, [src.data_ptr()], [out2.data_ptr()], [4096], gate=gate)
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert torch.equal(out2[:4096], src[:4096])
