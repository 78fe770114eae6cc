"""Staging that the ranks of one host write into directly: torch symmetric memory.

On one host with NVLink (or PCIe peer access), a sender can write the rows a receiver needs
straight into the receiver's staging buffer: the buffer is a symmetric allocation
(``torch.distributed._symmetric_memory``), mapped into every rank's address space. Two ways
write it, neither needing packing or a receive call:

* :meth:`PeerStaging.push`: a ``copy_`` per row from a live weight row into a peer's mapping,
  a peer-to-peer ``cudaMemcpyAsync`` that the GPU's copy engines execute, so the model's kernels
  keep every SM while weights move (the asynchronous mover);
* :meth:`PeerStaging.push_rows`: one launch of the row-copy kernel (:mod:`eplb.row_copy`) for
  every row, on every SM: a synchronous move stalls the model anyway, and one launch to
  several receivers outruns copy-engine copies there.

The pool is one symmetric uint8 buffer per (process group, device), grown collectively when a
move needs more (every rank computes the same size from the same plans) and kept for later
moves, since making one takes a rendezvous of the whole group. ``release_staging`` frees it.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.row_copy import PUSH, copy_rows, device_index, own_stream, prepare_gates
from eplb.row_copy import available as row_kernel_available

__all__ = [
    "PUSH_STREAMS",
    "PeerStaging",
    "drop_group_staging",
    "drop_staging",
    "peer_staging",
    "ready_staging",
    "release_staging",
    "wait_commits",
]

# Streams the pushes of a synchronous move are spread over: one stream's copies run one after
# another on one copy engine, several streams' copies run on several at once. Measured on
# 4 x H200 (bench/results/profile_sync_*_h200.json), pushes to three receivers took 1.89-1.91
# ms with two streams, 1.87-1.98 with one and 2.09-2.13 with four; to one receiver 1.77-1.79
# with one or two, 1.82 with four. A background mover uses one: it is in no hurry, and takes
# less memory bandwidth from the model.
PUSH_STREAMS = 2

# Pools by (id of the group, device index): a rendezvous per move would cost milliseconds. The
# pool holds its group, so the id is not reused while the entry lives.
_POOLS: dict[tuple[int, int], PeerStaging] = {}
# (group, why it cannot use peer staging, "" if it can) by id of the group: decided once per
# group, collectively.
_REASONS: dict[int, tuple[object, str]] = {}


class PeerStaging:
    """A symmetric staging buffer of one process group on one host, in ``regions`` equal
    regions.

    Attributes:
        capacity: bytes of the buffer on every rank (the same everywhere).
        regions: regions of the buffer: ``move_experts`` keeps two and moves into them in
            turn, so that a move may push while the previous move's commit reads the other one.
        region_bytes: bytes of one region (``capacity / regions``).
        moves: moves committed through this buffer (every rank counts alike); the next move
            stages in region ``moves % regions``.
        local: uint8 ``[capacity]``, this rank's buffer (peers write into it).
        ready: CUDA event recorded after the last commit that read ``local``.
        streams: the streams that copy-engine pushes are spread over.
        gated: whether moves through the pool queue gated commits (``move_experts``' pools):
            then :meth:`reserve` loads the gate's kernels.
    """

    def __init__(
        self,
        group: object,
        device: torch.device,
        streams: int = PUSH_STREAMS,
        regions: int = 1,
        gated: bool = False,
    ) -> None:
        self.group, self.device, self.regions, self.gated = group, device, regions, gated
        self.capacity = self.region_bytes = self.moves = 0
        self.local = torch.empty(0, dtype=torch.uint8, device=device)
        self.ready: torch.cuda.Event | None = None
        self._handle: object = None  # the rendezvous: keeps the peers' mappings alive
        self._remote: list[torch.Tensor] = []
        self._addresses: list[int] = []  # of the _remote buffers
        self.streams = [torch.cuda.Stream(device) for _ in range(streams)]

    @functools.cached_property
    def commit_stream(self) -> torch.cuda.ExternalStream:
        """Where a move that pushes ahead queues its gated commit (``eplb.move_exec``): a stream
        of the pool's own, made at the first such move, since it may wait forever behind an
        agreement that never comes (the gate's kernels were loaded by :meth:`reserve`)."""
        return own_stream(self.device)

    @property
    def region(self) -> int:
        """Byte offset of the region the next move stages in."""
        return self.moves % self.regions * self.region_bytes

    def reserve(self, nbytes: int) -> None:
        """Grow so that every region holds at least ``nbytes`` (collective: every rank calls it
        with the same value)."""
        if nbytes <= self.region_bytes:
            return
        from torch.distributed import _symmetric_memory as symm

        self.wait_ready()
        self.local, self._remote = torch.empty(0, dtype=torch.uint8, device=self.device), []
        self._addresses = []
        self._handle, self.capacity, self.region_bytes = None, 0, 0
        total = nbytes * self.regions
        local = symm.empty(total, dtype=torch.uint8, device=self.device)
        handle = symm.rendezvous(local, self.group)
        self._remote = [
            handle.get_buffer(peer, (total,), torch.uint8, 0) for peer in range(handle.world_size)
        ]
        self._addresses = [buf.data_ptr() for buf in self._remote]
        self.local, self._handle, self.capacity, self.region_bytes = local, handle, total, nbytes
        if self.gated and row_kernel_available():
            # In a move that pushes nothing yet: loading kernels waits for the device's work.
            prepare_gates(self.device)

    def _check_write(self, rank: int, offset: int, nbytes: int) -> None:
        if not 0 <= rank < len(self._remote) or offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(
                f"staging write [{offset}, {offset + nbytes}) outside the {self.capacity}-byte "
                f"buffer of rank {rank} (group of {len(self._remote)})"
            )

    def remote(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 ``[nbytes]`` view of group rank ``rank``'s buffer from byte ``offset``."""
        self._check_write(rank, offset, nbytes)
        return self._remote[rank][offset : offset + nbytes]

    def remote_address(self, rank: int, offset: int, nbytes: int) -> int:
        """Device address of byte ``offset`` of group rank ``rank``'s buffer, where ``nbytes``
        bytes fit."""
        self._check_write(rank, offset, nbytes)
        return self._addresses[rank] + offset

    def push(
        self,
        copies: list[tuple[torch.Tensor, int, int]],
        pause: Callable[[], None] | None = None,
    ) -> torch.cuda.Event:
        """Queue ``(source, rank, byte offset)`` copies into peers' buffers after the current
        stream's work, spread over :attr:`streams`, calling ``pause`` between them; returns an
        event on the current stream that completes with the last of them (the current stream
        waits for them too)."""
        current = torch.cuda.current_stream(self.device)
        used = self.streams[: max(1, min(len(copies), len(self.streams)))]
        for stream in used:
            stream.wait_stream(current)
        try:
            # Copy i on stream i % len(used), each stream's copies queued together: entering a
            # stream context costs more host time than queueing a copy.
            for k, stream in enumerate(used):
                with torch.cuda.stream(stream):
                    for src, rank, offset in copies[k :: len(used)]:
                        self.remote(rank, offset, src.numel()).copy_(src)
                        if pause is not None:
                            pause()
        finally:  # also after a failure: what follows on the stream follows the queued copies
            for stream in used:
                current.wait_stream(stream)
        event = torch.cuda.Event()
        event.record(current)
        return event

    def push_rows(self, spans: list[tuple[int, int, int, int]]) -> torch.cuda.Event:
        """Queue ``(source address, rank, byte offset, bytes)`` copies into peers' buffers on
        the current stream as one launch of the row-copy kernel (every SM; ``eplb.row_copy``),
        in the order given; returns an event recorded after them."""
        src, dst, nbytes = [], [], []
        for source, rank, offset, size in spans:
            src.append(source)
            dst.append(self.remote_address(rank, offset, size))
            nbytes.append(size)
        copy_rows(self.device, src, dst, nbytes, PUSH)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def mark_read(self, stream: torch.cuda.Stream) -> None:
        """Record that ``stream``'s queued work is the last to read ``local``."""
        self.ready = torch.cuda.Event()
        self.ready.record(stream)

    def wait_ready(self) -> None:
        """Block until the last commit that read ``local`` has run."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    def order_after_read(self) -> None:
        """Make the current stream wait (on the device; the host goes on) for the last commit
        that read ``local``."""
        if self.ready is not None and not self.ready.query():  # a query costs less than a wait
            torch.cuda.current_stream(self.device).wait_event(self.ready)


def _group_or_world(group: object) -> object:
    """``group``, or the default group for None."""
    return group if group is not None else dist.group.WORLD


def _why_not(group: object, device: torch.device, size: int) -> str:
    """Why ``group`` cannot stage through peer memory ("" if it can). Collective: every rank
    gathers the hosts of all ranks."""
    if device.type != "cuda":
        return "the weights are not on a CUDA device"
    if size < 2:
        return "a single rank moves nothing between ranks"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as err:  # torch built without distributed symmetric memory
        return f"torch has no symmetric memory ({err})"
    hosts: list = [None] * size
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) != 1:
        return f"the ranks are on {len(set(hosts))} hosts"
    return ""


def peer_staging(
    group: object, device: torch.device, size: int, shared: bool = True, streams: int = PUSH_STREAMS
) -> tuple[PeerStaging | None, str]:
    """A peer staging pool of ``group`` on ``device``, or (None, why not).

    ``shared``: the pool that ``move_experts`` keeps per group; otherwise a new one (an
    ``ExpertMover``'s own) pushing on ``streams`` streams. Collective on its first call per
    group (every rank of the group must call it at the same point): the ranks gather their host
    names, and peer staging is used only when they are all on one host.
    """
    pg = _group_or_world(group)
    if id(pg) not in _REASONS:
        _REASONS[id(pg)] = (pg, _why_not(pg, device, size))
    why = _REASONS[id(pg)][1]
    if why:
        return None, why
    if not shared:
        return PeerStaging(pg, device, streams), ""
    key = (id(pg), device_index(device))
    if key not in _POOLS:
        _POOLS[key] = PeerStaging(pg, device, regions=2, gated=True)
    return _POOLS[key], ""


def ready_staging(group: object, device: torch.device, nbytes: int) -> PeerStaging | None:
    """The pool that ``move_experts`` keeps for ``group`` on ``device`` if it exists and each of
    its regions holds ``nbytes``, else None. Not collective (unlike :func:`peer_staging`):
    every rank of a group that made the same moves gets the same answer."""
    pool = _POOLS.get((id(_group_or_world(group)), device_index(device)))
    return pool if pool is not None and pool.region_bytes >= nbytes else None


# Pools dropped after a failed move: a copy still in flight may write into them, so their
# memory is never freed or reused while the process lives.
_DROPPED: list[PeerStaging] = []


def drop_staging(pool: PeerStaging | None) -> None:
    """Retire ``pool`` after a failed move (every rank does, at the same move): the next move
    makes a new one, so that no late write of the failed move can reach it."""
    if pool is None:
        return
    for key, value in list(_POOLS.items()):
        if value is pool:
            del _POOLS[key]
    _DROPPED.append(pool)


def drop_group_staging(group: object) -> None:
    """:func:`drop_staging` for every pool of ``group`` (by a rank that does not know which
    device its pool is on, e.g. after its own arguments were refused)."""
    pg = _group_or_world(group)
    for key, pool in list(_POOLS.items()):
        if key[0] == id(pg):
            drop_staging(pool)


def wait_commits() -> None:
    """Block until no commit still reads a pool (before a move lets peers write into it)."""
    for pool in _POOLS.values():
        pool.wait_ready()


def release_staging() -> None:
    """Free every peer staging pool of this process (after its last move; the next move
    makes a new one, a collective rendezvous)."""
    for pool in _POOLS.values():
        pool.wait_ready()
    _POOLS.clear()
