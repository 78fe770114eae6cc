"""Many byte copies on one GPU in one kernel launch: the pushes and the commit of a synchronous
expert move (docs/moves.md).

As ``copy_`` calls, a move's dozens of row copies (one per weight kind and expert) each cost
host time and a launch, and a peer copy runs on a copy engine, which reaches less of NVLink
than the SMs do. A synchronous move stalls the model anyway, so its copies may take every SM:
``copy_rows`` queues them all as one kernel (``eplb._C``, built with the CUDA kernels) that
copies, chunk by chunk over every SM, one copy after another in the order given. Either end
of a copy may be memory of a peer GPU mapped into this one (``eplb.move_peer``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eplb import _C

__all__ = ["LOCAL", "PUSH", "available", "copy_rows"]

# Launch shapes (blocks per SM, bytes a block copies before taking its next chunk). The blocks
# work on neighbouring chunks, so the shape sets how many copies run at once. Measured on
# 4 x H200 (bench/results/profile_sync_4gpu_h200_row_kernel.json, *_timeline.json):
# * PUSH: bench_moves' pushes took 1.76 ms with 2 blocks per SM and 1 MiB chunks -- a few rows,
#   so several receivers, at once -- against 1.93-1.95 with 64 or 256 KiB chunks; on 2 GPUs
#   every shape took 1.71-1.73 ms;
# * LOCAL (packs, saves, commits): its commit took 0.320 ms with 1 block per SM and 64 KiB
#   chunks, 0.339 with the push shape (one copy_ of the same bytes: 0.309).
PUSH = (2, 1 << 20)
LOCAL = (1, 64 << 10)


def available() -> bool:
    """Whether ``eplb._C`` was built with the row-copy kernel (a CUDA build)."""
    return hasattr(_C, "copy_rows_cuda")


def copy_rows(
    device: torch.device,
    src: Sequence[int],
    dst: Sequence[int],
    nbytes: Sequence[int],
    shape: tuple[int, int] = LOCAL,
) -> None:
    """Queue the copies ``src[i] -> dst[i]`` of ``nbytes[i]`` bytes each on ``device``'s current
    stream (one launch per 64 copies).

    Args:
        device: the CUDA device that runs the copies.
        src, dst: device addresses (``tensor.data_ptr()`` plus a byte offset) that ``device``
            can reach; no copy may overlap another's destination or its own source.
        nbytes: bytes of each copy (>= 0).
        shape: (blocks per SM, bytes a block copies at a time: a positive multiple of 16);
            :data:`PUSH` for copies into peers, :data:`LOCAL` for copies within the device.

    Raises:
        RuntimeError: this build has no CUDA kernels, or CUDA failed to launch.
        ValueError: lengths differ, a size is negative, or an address is null.
    """
    if not available():
        raise RuntimeError("eplb._C was built without CUDA: no row-copy kernel (LPLB_CUDA=1)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    _C.copy_rows_cuda(index, src, dst, nbytes, *shape, current_stream(index))


def current_stream(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream, the cheap way where torch has it
    (``torch.cuda.current_stream`` costs microseconds of Python per call)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
