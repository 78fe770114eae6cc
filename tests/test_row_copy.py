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


def test_without_the_kernel_copy_rows_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_copy, "available", lambda: False)
    with pytest.raises(RuntimeError, match="without CUDA"):
        row_copy.copy_rows(torch.device("cuda", 0), [1], [2], [3])


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


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 16), (3, 4096), row_copy.LOCAL, row_copy.PUSH])
@pytest.mark.parametrize("count", [1, 64, 150])
def test_copies_match_torch(shape: tuple[int, int], count: int) -> None:
    """Random copies from one buffer into another, more than one launch's 64 when count is
    150, against the same copies done by torch one by one."""
    device = torch.device("cuda", 0)
    rng = random.Random(shape[1] * 1000 + count)
    size = 8 << 20
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    out = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    want = out.clone()
    copies = _random_copies(rng, size, count, 2 << 20)
    for s, d, n in copies:
        want[d : d + n].copy_(src[s : s + n])
    row_copy.copy_rows(
        device,
        [src.data_ptr() + s for s, _, _ in copies],
        [out.data_ptr() + d for _, d, _ in copies],
        [n for _, _, n in copies],
        shape,
    )
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
