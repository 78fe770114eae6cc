"""Many byte copies on one GPU in one kernel launch: the pushes and the commit of a synchronous
expert move (docs/moves.md).

As ``copy_`` calls, a move's dozens of row copies (one per weight kind and expert) each cost
host time and a launch, and a peer copy runs on a copy engine, which reaches less of NVLink
than the SMs do. A synchronous move stalls the model anyway, so its copies may take every SM:
``copy_rows`` queues them all as one kernel (``eplb._C``, built with the CUDA kernels) that
copies, chunk by chunk over every SM, one copy after another in the order given. Either end
of a copy may be memory of a peer GPU mapped into this one (``eplb.move_peer``).

A :class:`Gate` lets a launch be queued before anyone knows whether it may copy: the kernel
checks, on the device, a table that work queued before it makes (a move's agreement, an
all-reduce of every rank's row) and copies only if every rank agreed -- and the host can still
close the gate if it gives up waiting, with an atomic answer of whether the copies had begun.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eplb import _C

__all__ = [
    "LOCAL",
    "PUSH",
    "Gate",
    "available",
    "copy_rows",
    "device_index",
    "own_stream",
    "prepare_gates",
]

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


def device_index(device: torch.device) -> int:
    """The index of CUDA ``device`` (the current device where it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _kernel_index(device: torch.device) -> int:
    """:func:`device_index`, once sure that ``eplb._C`` has the kernels (else RuntimeError)."""
    if not available():
        raise RuntimeError(
            "eplb._C was built without CUDA: no row copies, gates or streams of its own "
            "(build with LPLB_CUDA=1)"
        )
    return device_index(device)


class Gate:
    """A condition that the launches of :func:`copy_rows` given it check on the device before
    copying anything: every row of ``table`` equals row ``rank``, whose first value is 1, and
    the gate is not closed.

    The first launch that passes claims the gate, and every later launch through it passes too,
    so copies split over several launches run all or none. :meth:`close` either closes the gate
    (no launch through it copies, now or later) or finds it claimed.

    Attributes:
        table: int64 ``[ranks, cols]`` on the CUDA device of the launches, written by work
            that the launches follow (an all-reduce of every rank's row: each rank writes its
            own row, zeros elsewhere).
        rank: the row that every row must equal.
        state: int32 ``[2]``: open (0), claimed (1) or closed (2); then :meth:`close`'s answer.
    """

    def __init__(self, table: torch.Tensor, rank: int) -> None:
        if not isinstance(table, torch.Tensor) or table.dtype != torch.int64:
            raise TypeError(f"a gate's table must be an int64 tensor, got {table!r}")
        if table.device.type != "cuda" or table.dim() != 2 or not table.is_contiguous():
            raise ValueError(
                f"a gate's table must be a contiguous CUDA tensor [ranks, cols], got shape "
                f"{tuple(table.shape)} on {table.device}"
            )
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"a gate's rank must be an int, got {rank!r}")
        if not table.numel() or not 0 <= rank < table.shape[0]:
            raise ValueError(f"rank {rank} is not a row of the gate's {tuple(table.shape)} table")
        prepare_gates(table.device)  # if not done earlier, at a quieter time
        self.table, self.rank = table, rank
        self.state = torch.zeros(2, dtype=torch.int32, device=table.device)

    def launch_args(self) -> tuple[int, int, int, int, int]:
        """(table address, rows, cols, rank, state address): the gate as ``eplb._C`` takes it."""
        rows, cols = self.table.shape
        return self.table.data_ptr(), rows, cols, self.rank, self.state.data_ptr()

    def close(self) -> bool:
        """Close the gate unless a launch through it already passed.

        Runs on a new stream that waits for no other, so that nothing queued before the
        launches -- say, an all-reduce that never completes -- holds it up, and blocks until
        the device answers.

        Returns:
            True if the gate is closed (nothing through it copies, now or later); False if a
            launch claimed it first (its copies run to completion).
        """
        return _C.close_gate_cuda(self.table.device.index, self.state.data_ptr()) != 1


def prepare_gates(device: torch.device) -> None:
    """Load the kernels of :class:`Gate` on ``device`` now (once per device; later calls cost
    nothing). CUDA loads a kernel when it is first used, and loading waits for the work running
    on the device: :meth:`Gate.close`, called while an all-reduce may never complete, must not
    be that first use. Call it where the device's work is short (``PeerStaging.reserve``)."""
    _C.load_gate_kernels_cuda(_kernel_index(device))


def own_stream(device: torch.device) -> torch.cuda.ExternalStream:
    """A new stream of ``device`` that no one else uses and that waits for no other stream
    unless told to (torch's ``Stream()`` hands out pooled streams, which other code may share:
    work that waits behind an all-reduce that never completes would hold theirs up too). It is
    never destroyed: make one per long-lived user. Also :func:`prepare_gates`."""
    index = _kernel_index(device)
    return torch.cuda.ExternalStream(_C.new_stream_cuda(index), device=torch.device("cuda", index))


def copy_rows(
    device: torch.device,
    src: Sequence[int],
    dst: Sequence[int],
    nbytes: Sequence[int],
    shape: tuple[int, int] = LOCAL,
    gate: Gate | None = None,
) -> None:
    """Queue the copies ``src[i] -> dst[i]`` of ``nbytes[i]`` bytes each on ``device``'s current
    stream (one launch per 64 copies), through ``gate`` if given: then nothing is copied unless
    it passes (:class:`Gate`).

    Args:
        device: the CUDA device that runs the copies.
        src, dst: device addresses (``tensor.data_ptr()`` plus a byte offset) that ``device``
            can reach; no copy may overlap another's destination or its own source.
        nbytes: bytes of each copy (>= 0).
        shape: (blocks per SM, bytes a block copies at a time: a positive multiple of 16);
            :data:`PUSH` for copies into peers, :data:`LOCAL` for copies within the device.

    Raises:
        RuntimeError: this build has no CUDA kernels, or CUDA failed to launch.
        TypeError: ``gate`` is not a :class:`Gate`.
        ValueError: lengths differ, a size is negative, an address is null, or the gate is on
            another device.
    """
    index = _kernel_index(device)
    if gate is not None and not isinstance(gate, Gate):
        raise TypeError(f"gate must be an eplb.row_copy.Gate or None, got {type(gate).__name__}")
    if gate is not None and gate.table.device.index != index:
        raise ValueError(f"the gate's table is on {gate.table.device}, the copies on cuda:{index}")
    gated = gate.launch_args() if gate is not None else ()
    _C.copy_rows_cuda(index, src, dst, nbytes, *shape, current_stream(index), *gated)


def current_stream(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream, the cheap way where torch has it
    (``torch.cuda.current_stream`` costs microseconds of Python per call)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
