"""Staged, all-or-nothing expert-weight moves between ranks over ``torch.distributed``.

One layer moves in four phases on every rank of the group:

1. *check*: every rank validates its arguments and the ranks exchange (ok, fingerprint of the
   placements, of the weights' layout and of the transport) -- a rank with bad arguments
   raises ``ValueError``/``TypeError``, the others :class:`ExpertMoveError`, before anything is
   sent; meanwhile each rank saves overwritten copy sources and packs its sends;
2. *transfer*: received rows land in a staging buffer, never in live weights. With peer
   staging (the GPUs of one host, :mod:`eplb.move_peer`) each sender copies its rows from the
   live weights straight into the receivers' staging (one launch of the row-copy kernel of
   :mod:`eplb.row_copy` on every SM where ``eplb._C`` has it, else copy engines); over the
   group each rank packs, per receiving peer, the rows it sends into one contiguous byte
   buffer and one ``batch_isend_irecv`` moves one message per (peer, direction);
3. *agree*: the ranks exchange whether their transfers completed (bounded by ``timeout``);
4. *commit*: only if every rank succeeded, staging and local copies are written into the live
   weights (one launch of the row-copy kernel, else a copy per row). Every read of the commit
   comes from staging or from a slot the move does not write, so the order of the writes does
   not matter (swaps and cycles are safe).

A move whose peer staging is ready from an earlier move (NCCL, no control group) pushes ahead:
it validates, pushes into the staging region the previous move did not use, and then exchanges
one row that is both the check and the agreement (queued on the device after the pushes), so
the host waits once. With the row-copy kernel its commit is queued too, before the answer, on
a stream behind the exchange, through a gate that the kernel checks on the device: the commit
starts as soon as the ranks agreed (``eplb.row_copy.Gate``).

On any failure every rank that is still alive raises :class:`ExpertMoveError` and its live
weights are untouched. See docs/moves.md for the guarantees, the wire format and their limits.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import time
import weakref
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

import torch
import torch.distributed as dist

from eplb.checks import INT_DTYPES, process_group, tensor
from eplb.move_peer import (
    PUSH_STREAMS,
    PeerStaging,
    drop_group_staging,
    drop_staging,
    peer_staging,
    ready_staging,
    wait_commits,
)
from eplb.move_plan import MovePlan, checked_placements, plan_moves
from eplb.row_copy import Gate, copy_rows
from eplb.row_copy import available as row_kernel_available

__all__ = ["ExpertMoveError", "MoveStats", "move_experts"]

# Test hook (fault injection): called as ``hook(event, info)`` with event "post" just before a
# layer's transfers are posted; ``info`` holds "rank", "layer" and the mutable list "ops".
_FAULT_HOOK: Callable[[str, dict], None] | None = None

# CUDA transfers of failed moves that may still be pending: kept alive for the life of the
# process, so that a late message can never land in memory that was freed and reused.
_ABANDONED: list[object] = []

# Polling a CUDA transfer: spin (yielding the GIL) for the first _SPIN_S seconds, since a sync
# move waits for milliseconds and a sleep overshoots by ~0.1 ms; then sleep _POLL_S per poll.
_SPIN_S = 0.05
_POLL_S = 5e-5

# move_experts copies rows with one launch of the row-copy kernel where eplb._C has it (every
# SM: a synchronous move stalls the model anyway), else with a copy_ per row. Tests switch it
# off to cover the copy_ path on GPUs.
ROW_KERNEL = True

# Ways to move rows between ranks (the ``transport`` argument).
TRANSPORTS = ("auto", "peer", "group")

# Phases of move_experts, in order (MoveStats.phases keys).
PHASES = ("check", "stage", "post", "transfer", "agree", "commit")


class ExpertMoveError(RuntimeError):
    """A move failed on this or another rank; the live weights of uncommitted layers are intact.

    After a transfer timed out the process group may be unusable (gloo closes the connection;
    NCCL cannot cancel a posted receive): re-create it before the next collective.
    """


@dataclass(frozen=True)
class MoveStats:
    """What a move did on this rank.

    Attributes:
        bytes_sent: bytes this rank sent to other ranks.
        bytes_received: bytes this rank received.
        bytes_copied: bytes copied between slots of this rank (no network).
        seconds: host wall time from the call (or ``start()``) to the last commit being issued;
            on a GPU the commit copies are queued on the current stream (or the current stream
            waits for a gated commit), not waited for.
        layers: the layers moved (committed).
        phases: seconds per phase. ``move_experts``: "check" (with saving overwritten copy
            sources and packing the rows to send), "stage" (taking the staging rows), "post"
            (posting the transfers, or the pushes), "transfer" (waiting for them),
            "agree", "commit" -- host wall time; a move that pushes ahead posts its pushes
            right after validating ("check"), then takes the staging rows, saves copy sources
            and prepares the commit ("stage"), then posts its one exchange, queues a gated
            commit behind it on the device (with the row-copy kernel) and waits for the
            exchange's answer ("transfer").
            With ``profile=True`` the device is drained at the end of each phase, so GPU work
            is counted in the phase that queued it. For ``ExpertMover`` see its ``profile``
            argument. Not part of equality.
    """

    bytes_sent: int
    bytes_received: int
    bytes_copied: int
    seconds: float
    layers: tuple[int, ...]
    phases: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Comm:
    """A process group as the movers use it."""

    group: object  # ProcessGroup or None (no torch.distributed: a single local rank)
    rank: int
    size: int
    global_ranks: tuple[int, ...]
    flag_device: torch.device  # where the small exchange tensors live (CPU for gloo)

    @property
    def polls(self) -> bool:
        """CUDA backends: ``wait(timeout)`` does not bound the host wait, so poll completion."""
        return self.flag_device.type == "cuda"


def comm_of(group: object, device: torch.device | None = None) -> Comm:
    """The :class:`Comm` of ``group`` (None: the default group, or one local rank).

    Flags are exchanged on ``device`` when it is a CUDA device and the group has NCCL (this
    also makes NCCL create its communicator, which a first batch of transfers that leaves a
    rank out could not do); otherwise on the CPU when the group has gloo.
    """
    process_group("group", group)
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return Comm(None, 0, 1, (0,), torch.device("cpu"))
    pg = dist.group.WORLD if group is None else group
    known = _GROUPS.get(pg)
    if known is None:
        rank = dist.get_rank(pg)
        if rank < 0:
            raise ValueError("this process is not a member of group")
        backend = str(dist.get_backend(pg)).lower()
        known = _GROUPS[pg] = (rank, tuple(dist.get_process_group_ranks(pg)), backend)
    rank, ranks, backend = known
    if "nccl" in backend and device is not None and device.type == "cuda":
        flag_device = device
    elif "nccl" in backend and "gloo" not in backend:
        flag_device = torch.device("cuda", torch.cuda.current_device())
    else:
        flag_device = torch.device("cpu")
    return Comm(pg, rank, len(ranks), ranks, flag_device)


# (this process's rank, the group's global ranks, backend) by process group, for as long as the
# group lives: asking torch.distributed costs a move tens of microseconds.
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_comm(comm: Comm, control_group: object) -> Comm:
    """The comm of the small exchanges (argument check, agreement): ``comm`` itself, or
    ``control_group``, which must be a CPU (gloo) group with the same ranks.

    On a CPU group the exchanges need no GPU kernel and no device synchronisation.
    """
    if control_group is None:
        return comm
    process_group("control_group", control_group)
    control = comm_of(control_group)
    if control.global_ranks != comm.global_ranks or control.flag_device.type != "cpu":
        raise ValueError("control_group must be a CPU (gloo) group with the same ranks as group")
    return control


def timeout_seconds(timeout: object) -> float:
    """``timeout`` (seconds as int/float, or a ``datetime.timedelta``) as positive seconds."""
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds or a datetime.timedelta, got {timeout!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return seconds


def flag(name: str, value: object) -> bool:
    """``value`` if it is a ``bool``, else ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def checked_weights(name: str, weights: object) -> list[torch.Tensor]:
    """One layer's weights: a non-empty sequence of contiguous tensors ``[slots, ...]``.

    Dtypes and trailing shapes may differ between entries (e.g. int8 weights and float
    scales); the number of slots and the device may not.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a list of tensors [slots, ...], got {type(weights)}")
    if not weights:
        raise ValueError(f"{name} is empty: give at least one weight tensor")
    out = list(weights)
    first = tensor(f"{name}[0]", out[0])
    slots, device = first.shape[0] if first.dim() else None, first.device
    for k, w in enumerate(out):
        if not isinstance(w, torch.Tensor):
            tensor(f"{name}[{k}]", w)  # raises its TypeError
        if w.dim() == 0 or w.shape[0] != slots or w.device != device:
            raise ValueError(
                f"{name}[{k}] has shape {tuple(w.shape)} on {w.device}; every entry must be "
                f"[{slots if slots is not None else 'slots'}, ...] on {device}"
            )
        if not w.is_contiguous():
            raise ValueError(f"{name}[{k}] must be contiguous (slots are sent as flat rows)")
    return out


def weights_layout(weights: Sequence[torch.Tensor]) -> str:
    """The dtype and per-slot shape of each weight tensor, as text (part of the fingerprint:
    the ranks' messages have matching sizes only if their layouts match)."""
    return ";".join(f"{w.dtype}{tuple(w.shape[1:])}" for w in weights)


def placement_fingerprint(
    old: torch.Tensor | Sequence[int], new: torch.Tensor | Sequence[int], layout: str = ""
) -> int:
    """A CRC of two placements (as int64) and a weights' layout: ranks compare it to catch
    differing arguments. Tensors and sequences of the same values give the same CRC."""
    if isinstance(old, torch.Tensor):
        data = torch.cat([old.reshape(-1), new.reshape(-1)]).to(torch.int64).numpy().tobytes()
    else:
        data = array("q", [*old, *new]).tobytes()  # native int64, as numpy's
    return zlib.crc32(layout.encode(), zlib.crc32(data))


def move_fingerprint(plan: MovePlan, weights: Sequence[torch.Tensor], mode: str) -> int:
    """:func:`placement_fingerprint` of a move: its placements, weights' layout and transport."""
    return placement_fingerprint(plan.old, plan.new, f"{weights_layout(weights)}|{mode}")


def _wait_works(works: Sequence[object], deadline: float, polls: bool) -> None:
    """Wait for every work by ``deadline`` (``time.monotonic``); raise on error or timeout.

    CUDA backends (``polls``): on failure the works are kept alive in ``_ABANDONED``, since a
    posted NCCL receive cannot be cancelled. gloo: after a failure the remaining works are
    still waited for (briefly once the deadline passed), so that each has settled -- done,
    failed, or its connection closed by the timeout -- before its buffers are freed.
    """
    failure: Exception | None = None
    spin_until = time.monotonic() + _SPIN_S
    for work in works:
        try:
            if polls:
                _poll(work.is_completed, deadline, spin_until)
                work.wait()  # orders the current stream after it; it has completed already
            else:
                left = max(deadline - time.monotonic(), 1e-3)
                work.wait(timeout=datetime.timedelta(seconds=left))
        except Exception as err:
            if polls:
                _ABANDONED.extend(works)
                raise
            failure = failure or err
    if failure is not None:
        raise failure


def _poll(done: Callable[[], bool], deadline: float, spin_until: float) -> None:
    """Call ``done()`` until it is true: spinning (yielding the GIL) until ``spin_until``, then
    sleeping ``_POLL_S`` per poll; ``TimeoutError`` past ``deadline`` (``time.monotonic``)."""
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("transfers did not complete within the timeout")
        time.sleep(0.0 if now < spin_until else _POLL_S)


class Exchange:
    """Every rank's ``row`` (ints), gathered by one all-reduce posted at construction: a CPU
    int64 ``[size, len(row)]`` table, the same on all ranks, from :meth:`result`.

    On a CUDA group the table is made on the device (one kernel per nonzero value of ``row``,
    no host-to-device copy: posting never waits for the work queued on the current stream,
    which a copy from pageable memory would), then one all-reduce and one device-to-host copy;
    on a CPU group no device work at all. Posting and waiting apart lets a caller do other work
    (or let a forward pass run) while the ranks arrive.
    """

    def __init__(self, comm: Comm, row: Sequence[int]) -> None:
        self.comm = comm
        self.work: object = None
        self.error: Exception | None = None
        try:
            # Made where it is reduced, one small kernel per nonzero value on a GPU: no copy
            # from host memory, which would wait for the work queued on the stream.
            self.table = torch.zeros(
                (comm.size, len(row)), dtype=torch.int64, device=comm.flag_device
            )
            mine = self.table[comm.rank]
            for j, value in enumerate(row):
                if value:
                    mine[j].fill_(value)
            if comm.group is not None:
                # The group's own all-reduce (a sum): what dist.all_reduce calls, without its
                # checks and logging, which cost the mover's step() more host time than this.
                self.work = comm.group.allreduce([self.table])
        except Exception as err:  # raised by result(), like a failed wait
            self.error = err

    def result(self, timeout: float) -> torch.Tensor:
        """The table, once every rank's row arrived.

        Raises:
            ExpertMoveError: the collective failed or did not complete within ``timeout``
                seconds (from now).
        """
        try:
            if self.error is not None:
                raise self.error
            if self.work is not None:
                _wait_works([self.work], time.monotonic() + timeout, self.comm.polls)
        except Exception as err:
            raise ExpertMoveError(
                f"rank {self.comm.rank}: the ranks could not agree within {timeout:g} s "
                f"({err}); live weights unchanged, the process group may be unusable"
            ) from err
        return self.table.cpu()


def exchange(comm: Comm, row: Sequence[int], timeout: float) -> torch.Tensor:
    """Every rank's ``row``: :class:`Exchange` posted and waited for (at most ``timeout``)."""
    return Exchange(comm, row).result(timeout)


def check_rows(
    comm: Comm,
    bad: BaseException | None,
    row: Sequence[int],
    timeout: float,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[list[list[int]], Exception | None]:
    """Before anything is sent: every rank's ``row`` (zeros from a rank with ``bad``
    arguments), as Python ints, and what ``meanwhile`` raised (None if nothing). ``meanwhile``
    (only if this rank accepted its arguments) runs while the ranks answer: local preparation
    that sends nothing; the caller reports its error at the agreement, which every rank
    reaches.

    Raises ``bad`` (this rank's argument error) if the exchange itself failed, else
    :class:`ExpertMoveError`; the caller raises ``bad`` after looking at the rows.
    """
    pending = Exchange(comm, [0] * len(row) if bad is not None else row)
    failure = None
    if bad is None and meanwhile is not None:
        try:
            meanwhile()
        except Exception as err:  # reported after the exchange, which every rank must finish
            failure = err
    try:
        table = pending.result(timeout)
    except ExpertMoveError:
        if bad is not None:
            raise bad from None  # this rank's own mistake is the more useful message
        raise
    return table.tolist(), failure


def check_together(
    comm: Comm,
    bad: BaseException | None,
    fingerprint: int,
    timeout: float,
    meanwhile: Callable[[], None] | None = None,
) -> Exception | None:
    """Before anything is sent: did every rank accept its arguments, with the same placements
    and weight layouts? ``meanwhile`` as for :func:`check_rows`; returns what it raised.

    Raises ``bad`` (this rank's argument error) here, :class:`ExpertMoveError` on the other
    ranks, or :class:`ExpertMoveError` everywhere when the fingerprints differ.
    """
    rows, failure = check_rows(comm, bad, [1, fingerprint], timeout, meanwhile)
    if bad is not None:
        raise bad
    refused = [r for r, (ok, _) in enumerate(rows) if not ok]
    if refused:
        raise ExpertMoveError(f"rank(s) {refused} rejected their arguments; nothing was moved")
    if any(fp != rows[0][1] for _, fp in rows):
        raise ExpertMoveError(
            "the ranks passed different placements or weight layouts (dtype and per-slot "
            "shape of each weight tensor); nothing was moved"
        )
    return failure


def transport_choice(transport: object, comm: Comm) -> str:
    """``transport`` checked: "group" where peer staging cannot apply (CPU weights, a CPU
    group, one rank), else as given ("auto" is resolved by :func:`peer_for`)."""
    if not isinstance(transport, str):
        raise TypeError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if comm.polls and comm.size > 1:
        return transport
    if transport == "peer":
        raise ValueError(
            "transport='peer' needs CUDA weights on an NCCL group of two or more ranks"
        )
    return "group"


def peer_for(
    comm: Comm, mode: str, device: torch.device, shared: bool = True, streams: int = PUSH_STREAMS
) -> PeerStaging | None:
    """The peer staging of a move in ``mode`` (see :func:`transport_choice`), or None to move
    over the group; ``shared`` and ``streams`` as for :func:`~eplb.move_peer.peer_staging`.
    Collective on the first call per group (the ranks compare hosts)."""
    if mode == "group":
        return None
    pool, why = peer_staging(comm.group, device, comm.size, shared, streams)
    if pool is None and mode == "peer":
        raise ValueError(f"transport='peer' is not possible here: {why}")
    return pool


def slot_bytes(weight: torch.Tensor) -> int:
    """Bytes of one slot of one weight kind (a tensor ``[S, ...]``)."""
    return math.prod(weight.shape[1:]) * weight.element_size()


def expert_bytes(weights: Sequence[torch.Tensor]) -> int:
    """Bytes of one slot's row: every weight kind of one expert (``[S, ...]`` tensors)."""
    return sum(slot_bytes(w) for w in weights)


def byte_rows(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each weight tensor ``[S, ...]`` as a uint8 view ``[S, bytes per slot]`` of its memory.

    Writing into a row writes the live weight; weights of any dtype travel as bytes.
    """
    slots = weights[0].shape[0]
    return [w.view(slots, math.prod(w.shape[1:])).view(torch.uint8) for w in weights]


class PhaseTimer:
    """Host wall time per phase; with a CUDA ``drain`` device, the device is synchronised at
    the end of each phase so that its GPU work is counted in it (profiling only)."""

    def __init__(self, drain: torch.device | None, start: float | None = None) -> None:
        self.drain = drain if drain is not None and drain.type == "cuda" else None
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter() if start is None else start
        self._last = self.start

    def lap(self, name: str) -> None:
        if self.drain is not None:
            torch.cuda.synchronize(self.drain)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


class Push(NamedTuple):
    """Rows pushed to one peer's staging (peer transport): local ``slots``, in order, into the
    peer's staging rows ``first``, ``first + 1``, ..."""

    dst: int
    slots: tuple[int, ...]
    first: int


# A write of the commit: (destination slot, (source "recv" | "saved" | "live", row or slot)).
Write = tuple[int, tuple[str, int]]


class LayerMove:
    """One layer's move on one rank: staging, transfers, commit.

    Staging is a uint8 ``[rows, expert_bytes]`` buffer of the received rows, grouped by source
    rank (ascending; within a source in plan order, which is the sender's order), each row the
    bytes of every weight kind of one expert back to back (kind 0 first); local copy sources
    that the move overwrites are saved in a second buffer of the same row format.

    Two transports fill the staging rows:

    * ``peer=None`` (the process group): one message per (sender, receiver) pair and layer,
      tagged with the layer -- the sender packs the rows into one buffer, the receiver receives
      them straight into its contiguous rows of that source;
    * ``peer`` (a :class:`~eplb.move_peer.PeerStaging` of one host): the receiver's staging is
      rows of its peer buffer from byte ``region``; each sender copies its rows from the live
      weights straight into them (no packing, nothing posted by the receiver).

    With ``kernel`` (CUDA weights and a CUDA build of ``eplb._C``) every batch of row copies --
    the pushes, packs, saved sources, the commit -- is one launch of the row-copy kernel
    (:mod:`eplb.row_copy`, every SM; given addresses, no views); else each row is a ``copy_``
    (the pushes on copy engines, spread over the pool's streams).
    """

    def __init__(
        self,
        plan: MovePlan,
        weights: list[torch.Tensor],
        comm: Comm,
        peer: PeerStaging | None = None,
        region: int = 0,
        kernel: bool = False,
    ) -> None:
        self.plan, self.weights, self.comm = plan, weights, comm
        self.peer, self.region = peer, region
        self.device = weights[0].device
        self.spans = []  # (offset, size) of each weight kind within a row
        offset = 0
        for w in weights:
            size = slot_bytes(w)
            self.spans.append((offset, size))
            offset += size
        self.expert_bytes = offset
        # One launch of the row-copy kernel for the pushes, packs, saves and the commit (CUDA,
        # eplb.row_copy), else a copy_ per row (copy engines for the pushes).
        self.kernel = kernel and self.device.type == "cuda" and row_kernel_available()
        # (address of slot 0, bytes per slot, offset within a row) of each nonempty weight kind.
        self.kinds = [
            (w.data_ptr(), size, off)
            for w, (off, size) in zip(weights, self.spans, strict=True)
            if size
        ]
        rank = comm.rank
        recvs, copies = plan.recvs[rank], plan.copies[rank]
        # plan.sends is sorted by receiver, in the receiver's recvs order within a pair.
        self.send_to: list[tuple[int, list[int]]] = []  # (dst_rank, source slots)
        for dst, slot in plan.sends[rank]:
            if self.send_to and self.send_to[-1][0] == dst:
                self.send_to[-1][1].append(slot)
            else:
                self.send_to.append((dst, [slot]))
        self.stats = (
            len(plan.sends[rank]) * self.expert_bytes,
            len(recvs) * self.expert_bytes,
            len(copies) * self.expert_bytes,
        )
        self.staging: torch.Tensor | None = None
        self.saved: torch.Tensor | None = None
        self.packs: list[tuple[int, torch.Tensor]] = []
        self.works: list[object] = []
        self.event: torch.cuda.Event | None = None  # after the pushes (peer transport)
        self.copies: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # commit's
        # Called between rows by a launching thread: lets the caller's thread take the GIL
        # (torch calls keep it, and Python hands it over only every few milliseconds).
        self.pause: Callable[[], None] | None = None

    @functools.cached_property
    def receives(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], list[Write]]:
        """``(recv_from, prestage, writes)``, made when first needed (a move that pushes ahead
        needs none of them before its pushes are queued):

        * recv_from: ``(source rank, first staging row, rows)`` per sending peer -- receives
          grouped by source rank, in plan order within a source (= the sender's order);
        * prestage: ``(live slot, saved row)`` of the local copy sources that the move
          overwrites (saved before the commit);
        * writes: ``(dst slot, source)`` of the commit, source ``("recv"|"saved", row)`` or
          ``("live", slot)``. Every read is a staging row or a slot that no write touches, so
          the writes may run in any order.
        """
        plan, rank = self.plan, self.comm.rank
        base = rank * plan.slots_per_rank
        recvs, copies = plan.recvs[rank], plan.copies[rank]
        order = sorted(range(len(recvs)), key=lambda i: (recvs[i][0], i))
        recv_row = {recvs[i][2]: row for row, i in enumerate(order)}  # dst slot -> staging row
        recv_from: list[tuple[int, int, int]] = []
        for row, i in enumerate(order):
            src = recvs[i][0]
            if recv_from and recv_from[-1][0] == src:
                recv_from[-1] = (src, recv_from[-1][1], recv_from[-1][2] + 1)
            else:
                recv_from.append((src, row, 1))
        written = set(recv_row) | {dst for _, dst in copies}
        # A copy reads the old content of its source when the source held the expert before
        # (MovePlan.copies); if the move overwrites that source, the old content is saved.
        old = [(src, dst) for src, dst in copies if plan.old[base + src] == plan.new[base + dst]]
        saved = sorted({src for src, _ in old if src in written})
        save_row = {s: i for i, s in enumerate(saved)}
        writes: list[Write] = [(dst, ("recv", recv_row[dst])) for _, _, dst in recvs]
        for src, dst in copies:
            if (src, dst) not in old:
                writes.append((dst, ("recv", recv_row[src])))
            elif src in save_row:
                writes.append((dst, ("saved", save_row[src])))
            else:
                writes.append((dst, ("live", src)))
        return recv_from, list(save_row.items()), writes

    @property
    def recv_from(self) -> list[tuple[int, int, int]]:
        return self.receives[0]

    @property
    def prestage(self) -> list[tuple[int, int]]:
        return self.receives[1]

    @property
    def writes(self) -> list[Write]:
        return self.receives[2]

    @functools.cached_property
    def rows(self) -> list[torch.Tensor]:
        """:func:`byte_rows` of the weights (made when first needed: the row-copy kernel takes
        addresses, not views)."""
        return byte_rows(self.weights)

    @property
    def moves_data(self) -> bool:
        """Whether this rank sends or receives anything in this layer."""
        return self.stats[0] + self.stats[1] > 0

    @staticmethod
    def staging_bytes(plan: MovePlan, expert_bytes: int) -> int:
        """The most staging bytes any rank needs for ``plan`` (the peer buffer size)."""
        return max((len(r) for r in plan.recvs), default=0) * expert_bytes

    def _pack(self, out: torch.Tensor, slots: Sequence[int]) -> None:
        """Copy the bytes of every weight kind of local ``slots`` into the rows of ``out`` (one
        launch of the row-copy kernel, else one device-to-device memcpy per row: for rows of
        megabytes faster than a multi-tensor copy kernel)."""
        if self.kernel:
            base = out.data_ptr()
            src, dst, nbytes = [], [], []
            for j, slot in enumerate(slots):
                for ptr, size, offset in self.kinds:
                    src.append(ptr + slot * size)
                    dst.append(base + j * self.expert_bytes + offset)
                    nbytes.append(size)
            copy_rows(out.device, src, dst, nbytes)
            return
        for j, slot in enumerate(slots):
            for rows, (offset, size) in zip(self.rows, self.spans, strict=True):
                if size:
                    out[j, offset : offset + size].copy_(rows[slot])
            if self.pause is not None:
                self.pause()

    def stage(self) -> None:
        """:meth:`stage_local` then :meth:`bind`."""
        self.stage_local(pack=self.peer is None)
        self.bind(self.peer, self.region)

    def stage_local(self, pack: bool) -> None:
        """Save overwritten copy sources and, with ``pack`` (the process group), pack the rows
        to send (device-to-device copies queued on the current stream; nothing leaves this
        rank, so this may run before the ranks agreed on the move)."""
        device = self.device
        if self.prestage:
            self.saved = torch.empty(
                (len(self.prestage), self.expert_bytes), dtype=torch.uint8, device=device
            )
            self._pack(self.saved, [slot for slot, _ in self.prestage])
        self.packs = []
        if self.expert_bytes and pack:
            for dst, slots in self.send_to:
                buf = torch.empty((len(slots), self.expert_bytes), dtype=torch.uint8, device=device)
                self._pack(buf, slots)
                self.packs.append((dst, buf))

    def bind(self, peer: PeerStaging | None, region: int = 0) -> None:
        """Take the staging rows: from byte ``region`` of ``peer``'s buffer (which must hold
        them), else a new buffer (the process group; the rows to send are packed now if they
        were not)."""
        self.peer, self.region = peer, region
        if peer is not None:
            self.packs = []
        elif not self.packs and self.send_to and self.expert_bytes:
            self.stage_local(pack=True)
        rows = len(self.plan.recvs[self.comm.rank])
        if peer is not None:
            nbytes = rows * self.expert_bytes
            self.staging = peer.local[region : region + nbytes].view(rows, self.expert_bytes)
        elif rows:
            self.staging = torch.empty(
                (rows, self.expert_bytes), dtype=torch.uint8, device=self.device
            )

    def prepare_commit(self) -> None:
        """Make the commit's views now (host work, e.g. while the transfers run)."""
        self.copies = self._commit_copies()

    def _ops(self) -> list[dist.P2POp]:
        """One send per receiving peer (its packed buffer) and one receive per sending peer
        (straight into that peer's contiguous staging rows)."""
        comm, tag = self.comm, self.plan.layer % (2**31)
        ops = [
            dist.P2POp(dist.isend, buf.view(-1), comm.global_ranks[dst], comm.group, tag)
            for dst, buf in self.packs
        ]
        if self.expert_bytes:
            for src, first, count in self.recv_from:
                view = self.staging[first : first + count].view(-1)
                ops.append(dist.P2POp(dist.irecv, view, comm.global_ranks[src], comm.group, tag))
        return ops

    def pushes(self) -> list[Push]:
        """One push per receiving peer: my rows land after the rows of lower source ranks."""
        rank = self.comm.rank
        return [
            Push(dst, tuple(slots), sum(src < rank for src, _, _ in self.plan.recvs[dst]))
            for dst, slots in self.send_to
        ]

    def _push_order(self, pushes: Sequence[Push]) -> list[tuple[int, int, int]]:
        """``(live slot, receiver, byte offset of its row in the receiver's staging)`` of each
        row of ``pushes``: row j to every receiver before row j + 1 to any, receivers in the
        order rank + 1, rank + 2, ... -- so that at any time the senders write into different
        receivers, rather than all of them into the lowest rank first."""
        world, rank, region, row_bytes = (
            self.comm.size,
            self.comm.rank,
            self.region,
            self.expert_bytes,
        )
        pushes = sorted(pushes, key=lambda push: (push.dst - rank) % world)
        return [
            (push.slots[j], push.dst, region + (push.first + j) * row_bytes)
            for j in range(max((len(push.slots) for push in pushes), default=0))
            for push in pushes
            if j < len(push.slots)
        ]

    def push_copies(self, pushes: Sequence[Push]) -> list[tuple[torch.Tensor, int, int]]:
        """The ``(live row of one weight kind, receiver, byte offset in its staging)`` copies
        of ``pushes``, in :meth:`_push_order`, weight kinds in order within a row."""
        kinds = [(k, offset) for k, (offset, size) in enumerate(self.spans) if size]
        return [
            (self.rows[k][slot], dst, at + offset)
            for slot, dst, at in self._push_order(pushes)
            for k, offset in kinds
        ]

    def push_spans(self, pushes: Sequence[Push]) -> list[tuple[int, int, int, int]]:
        """The ``(source address, receiver, byte offset in its staging, bytes)`` copies of
        ``pushes`` for the row-copy kernel, in the order of :meth:`push_copies`."""
        return [
            (ptr + slot * size, dst, at + offset, size)
            for slot, dst, at in self._push_order(pushes)
            for ptr, size, offset in self.kinds
        ]

    def post(self) -> None:
        """Post the transfers (after :meth:`stage`; they follow the current stream's work)."""
        if self.peer is None:
            ops = self._ops()
            if _FAULT_HOOK is not None:
                _FAULT_HOOK("post", {"rank": self.comm.rank, "layer": self.plan.layer, "ops": ops})
            self.works = dist.batch_isend_irecv(ops) if ops else []
            return
        pushes = self.pushes() if self.expert_bytes else []
        if _FAULT_HOOK is not None:
            _FAULT_HOOK("post", {"rank": self.comm.rank, "layer": self.plan.layer, "ops": pushes})
        pushed = [0] * self.comm.size
        for push in pushes:
            pushed[push.dst] += len(push.slots)
        if self.kernel:
            self.event = self.peer.push_rows(self.push_spans(pushes))
        else:
            self.event = self.peer.push(self.push_copies(pushes), self.pause)
        # Nobody waits for a push, so a missing one must fail here, on the sender.
        for dst, slots in self.send_to:
            if pushed[dst] != len(slots):
                raise RuntimeError(
                    f"pushed {pushed[dst]} of the {len(slots)} rows rank {dst} needs"
                )

    def launch(self) -> None:
        """:meth:`stage` then :meth:`post`."""
        self.stage()
        self.post()

    def transfers_done(self) -> bool:
        """Non-blocking: have this rank's transfers completed? (CUDA only.)"""
        if self.event is not None:
            return self.event.query()
        return all(w.is_completed() for w in self.works)

    def wait(self, deadline: float) -> None:
        """Block until this rank's transfers completed; raise on error or past ``deadline``."""
        if self.event is not None:
            _poll(self.event.query, deadline, time.monotonic() + _SPIN_S)
        else:
            _wait_works(self.works, deadline, self.comm.polls)

    def _commit_copies(self) -> tuple[list, list]:
        """(destinations, sources) of the commit: a live row per weight kind of every written
        slot, and the staging row, saved row or live row it takes -- as addresses for the
        row-copy kernel, else as views."""
        if self.kernel:
            return self._commit_addresses()
        buffers = {"recv": self.staging, "saved": self.saved}
        dst, src = [], []
        for slot, (kind, index) in self.writes:
            for rows, (offset, size) in zip(self.rows, self.spans, strict=True):
                if size:
                    dst.append(rows[slot])
                    if kind == "live":
                        src.append(rows[index])
                    else:
                        src.append(buffers[kind][index, offset : offset + size])
        return dst, src

    def _commit_addresses(self) -> tuple[list[int], list[int]]:
        """:meth:`_commit_copies` as device addresses, one per weight kind of every write."""
        bases = {
            kind: buf.data_ptr()
            for kind, buf in (("recv", self.staging), ("saved", self.saved))
            if buf is not None
        }
        dst, src = [], []
        for slot, (kind, index) in self.writes:
            for ptr, size, offset in self.kinds:
                dst.append(ptr + slot * size)
                if kind == "live":
                    src.append(ptr + index * size)
                else:
                    src.append(bases[kind] + index * self.expert_bytes + offset)
        return dst, src

    def commit(self, gate: Gate | None = None) -> None:
        """Write the new content of every changed slot (queued on the current stream), from
        the copies of :meth:`prepare_commit` (made while the transfers ran): one launch of the
        row-copy kernel -- through ``gate`` if given (:class:`~eplb.row_copy.Gate`) -- else one
        copy per row (on a GPU each a device-to-device memcpy, faster for rows of megabytes
        than one multi-tensor copy kernel)."""
        dst, src = self.copies if self.copies is not None else self._commit_copies()
        if self.kernel:
            nbytes = [size for _, size, _ in self.kinds] * len(self.writes)
            copy_rows(self.device, src, dst, nbytes, gate=gate)
            return
        if gate is not None:
            raise ValueError("a gated commit needs the row-copy kernel")
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def release(self) -> None:
        """Drop the buffers after a commit (their transfers have completed)."""
        self.staging, self.saved, self.packs, self.works = None, None, [], []
        self.copies = None

    def abandon(self) -> None:
        """Drop the buffers after a failure; CUDA transfers that may still be pending keep their
        buffers alive (gloo ones have settled in :meth:`wait`)."""
        pending = self.event is not None and not self.event.query()
        if (self.works and self.comm.polls) or pending:
            _ABANDONED.append((self.works, self.staging, self.saved, self.packs))
        self.release()


def layer_plan(
    plan: object, old_phy2log: object, new_phy2log: object, num_ranks: int, slots: int
) -> MovePlan:
    """The checked :class:`MovePlan` of one layer: ``plan`` itself or one made from the maps."""
    old = new = None
    if not (
        isinstance(plan, MovePlan)
        and _placement_of(old_phy2log, plan.old)
        and _placement_of(new_phy2log, plan.new)
    ):  # else as valid as the placements the plan was made from, and [R]
        old, new, _, _ = checked_placements(old_phy2log, new_phy2log, num_ranks)
        if torch.as_tensor(old_phy2log).dim() != 1:
            raise ValueError(
                "move_experts moves one layer: old_phy2log must be [R], got shape "
                f"{tuple(torch.as_tensor(old_phy2log).shape)} (use ExpertMover for [L, R])"
            )
    if plan is None:
        plan = plan_moves(old[0], new[0], num_ranks)
    elif not isinstance(plan, MovePlan):
        raise TypeError(f"plan must be a MovePlan or None, got {type(plan).__name__}")
    elif old is not None and (
        plan.old != tuple(old[0].tolist()) or plan.new != tuple(new[0].tolist())
    ):
        raise ValueError("plan was made for other placements than old_phy2log/new_phy2log")
    elif plan.num_ranks != num_ranks:
        raise ValueError(f"plan is for {plan.num_ranks} ranks, the group has {num_ranks}")
    if plan.slots_per_rank != slots:
        raise ValueError(
            f"the placements give {plan.slots_per_rank} slots per rank but the weights hold {slots}"
        )
    return plan


def _placement_of(placement: object, held: tuple[int, ...]) -> bool:
    """Whether ``placement`` is a CPU integer tensor ``[R]`` holding exactly ``held`` (a plan's
    placement, validated when the plan was made): then it needs no second validation."""
    return (
        isinstance(placement, torch.Tensor)
        and placement.device.type == "cpu"
        and placement.dtype in INT_DTYPES
        and placement.dim() == 1
        and tuple(placement.tolist()) == held
    )


def move_experts(
    weights: Sequence[torch.Tensor],
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    group: object = None,
    plan: MovePlan | None = None,
    *,
    timeout: float | datetime.timedelta = 60.0,
    control_group: object = None,
    transport: str = "auto",
    profile: bool = False,
) -> MoveStats:
    """Move one layer's expert weights in place from ``old_phy2log`` to ``new_phy2log``.

    Collective: every rank of ``group`` calls it with the same placements. Receives land in
    staging buffers and replace live weights only after every transfer of the layer completed
    on every rank; on any failure nothing live changes anywhere. On the process group each rank
    sends one message per receiving peer (its rows packed into one buffer) and receives one per
    sending peer; with peer staging each rank copies its rows straight into the receivers'
    staging buffers (copy engines).

    Args:
        weights: this rank's weights of the layer, a list of contiguous tensors
            ``[S, ...]`` (S = local slots; one per weight kind, e.g. w1/w2/w3, any dtype, any
            trailing shape, quantisation scales as further entries), all on one device (CUDA
            with NCCL -- after ``torch.cuda.set_device`` -- or CPU with gloo). Every rank must
            pass the same dtypes and per-slot shapes.
        old_phy2log: [R] integer, the placement the weights are in now (-1 unused).
        new_phy2log: [R] integer, the target placement.
        group: the expert-parallel process group (None: the default group; without an
            initialised ``torch.distributed``, a single rank).
        plan: a :class:`MovePlan` from ``plan_moves(old, new, group size)`` to reuse.
        timeout: seconds (or ``timedelta``) that each of the three waits (argument check,
            transfers, agreement) may take.
        control_group: a CPU (gloo) group with the same ranks as ``group`` for the two small
            exchanges (argument check, agreement); None: ``group`` itself (on NCCL each is a
            tiny all-reduce on the GPU with a device-to-host copy).
        transport: "auto" (peer staging when the group is NCCL and all its ranks are on one
            host, else the group), "peer" (torch symmetric memory staging written by copy
            engines; ``ValueError`` where impossible) or "group" (``batch_isend_irecv``). Every
            rank must pass the same. The first peer move of a group makes a staging buffer
            of two regions, each the largest receive of any rank (a collective rendezvous);
            it is kept for later moves (``release_staging``), which then push ahead of the
            check's answer when no ``control_group`` is given (docs/moves.md).
        profile: drain the device at the end of each phase so that ``MoveStats.phases``
            counts GPU time too (for benchmarks: it adds synchronisations).

    Returns:
        :class:`MoveStats` of this rank.

    Raises:
        TypeError, ValueError: bad arguments on this rank (the other ranks raise
            ``ExpertMoveError``); nothing was sent.
        ExpertMoveError: the move failed on some rank (exception, timeout, a peer gone);
            raised on every surviving rank, live weights untouched.
    """
    start = time.perf_counter()
    seconds = timeout_seconds(timeout)
    first = weights[0] if isinstance(weights, Sequence) and weights else None
    device = first.device if isinstance(first, torch.Tensor) else None
    comm = comm_of(group, device)
    control, bad, fingerprint, mode, ahead = comm, None, 0, "group", None
    timer = PhaseTimer(None, start)
    try:
        control = control_comm(comm, control_group)
        timer = PhaseTimer(device if flag("profile", profile) else None, start)
        mode = transport_choice(transport, comm)
        ws = checked_weights("weights", weights)
        layer = layer_plan(plan, old_phy2log, new_phy2log, comm.size, ws[0].shape[0])
        move = LayerMove(layer, ws, comm, kernel=ROW_KERNEL)
        ahead = staging_ahead(comm, control, mode, move)
        if ahead is None:
            fingerprint = move_fingerprint(layer, ws, mode)
    except (TypeError, ValueError) as err:
        bad = err
    if ahead is not None:
        return _move_ahead(move, ahead, control, mode, seconds, timer)
    wait_commits()  # no peer may write into staging that a commit still reads

    def prepare() -> None:  # while the ranks answer the check (only if bad is None)
        move.stage_local(pack=mode == "group")

    # Row: [ok, fingerprint, pushed ahead, staging region]; see _verdict.
    rows, failure = check_rows(control, bad, [1, fingerprint, 0, 0], seconds, prepare)
    why = _verdict(rows)
    if why is not None or bad is not None:
        if any(row[2] for row in rows):  # ranks that pushed ahead drop the staging: so do we
            drop_group_staging(comm.group)
        if bad is not None:
            raise bad
        raise ExpertMoveError(f"{why}; live weights unchanged")
    peer = peer_for(comm, mode, ws[0].device)
    timer.lap("check")

    try:
        if failure is not None:
            raise failure
        if peer is not None:
            peer.reserve(LayerMove.staging_bytes(layer, move.expert_bytes))
        move.bind(peer, peer.region if peer is not None else 0)
        timer.lap("stage")
        move.post()
        move.prepare_commit()  # while the transfers run
        timer.lap("post")
        move.wait(time.monotonic() + seconds)
        timer.lap("transfer")
    except Exception as err:  # any local failure: report it, then raise on every rank together
        failure = err
    try:
        table = exchange(control, [int(failure is None)], seconds)
    except ExpertMoveError as err:
        _drop(move, peer)
        raise err from failure
    failed = (table[:, 0] == 0).nonzero().flatten().tolist()
    if failed:
        _fail(move, peer, f"the transfers failed on rank(s) {failed}", failure)
    timer.lap("agree")
    return _commit(move, peer, timer, start)


def staging_ahead(comm: Comm, control: Comm, mode: str, move: LayerMove) -> PeerStaging | None:
    """The peer staging ``move`` may push into before the ranks agreed on it, or None.

    That takes a pool of the group made by an earlier move, with regions large enough (every
    rank that made the same moves decides alike, and the ranks compare the decisions after the
    pushes), and exchanges on the group (NCCL). The move stages in the region that the previous
    move did not use: the commit that last read it ran before the previous move's agreement on
    its rank (same stream, or ordered after it), and every rank saw that agreement complete
    before this move began -- so no push lands in staging that a commit still reads, and the
    move needs one exchange, after the pushes, instead of a check before and an agreement after.
    """
    if mode == "group" or control is not comm or not comm.polls:
        return None
    nbytes = LayerMove.staging_bytes(move.plan, move.expert_bytes)
    return ready_staging(comm.group, move.device, nbytes)


def _move_ahead(
    move: LayerMove,
    peer: PeerStaging,
    control: Comm,
    mode: str,
    seconds: float,
    timer: PhaseTimer,
) -> MoveStats:
    """The rest of :func:`move_experts` for a move that pushes ahead: push, then one exchange
    that is both the check and the agreement (its fingerprint of the placements, the weights'
    layout and ``mode`` is made while the pushes run), then commit. Everything the pushes do not
    need waits until they are queued: the staging view, saving overwritten copy sources and
    the commit's copies only have to precede the commit. With the row-copy kernel the commit is
    queued before the answer, gated on the device (:func:`_gated_commit`); if the answer does
    not come in time the host closes the gate, and if the gate had passed already (the ranks
    agreed just after the deadline) the move completes."""
    failure = None
    peer.order_after_read()  # what follows on this stream follows the last commit
    move.peer, move.region = peer, peer.region  # where the pushes land
    timer.lap("check")
    try:
        move.post()
    except Exception as err:  # reported through the exchange, which every rank reaches
        failure = err
    timer.lap("post")
    if failure is None:
        try:
            move.bind(peer, peer.region)
            move.stage_local(pack=False)
            move.prepare_commit()
        except Exception as err:
            failure = err
    fingerprint = move_fingerprint(move.plan, move.weights, mode)
    timer.lap("stage")
    row = [int(failure is None), fingerprint, 1, peer.moves % peer.regions]
    exchanged = Exchange(control, row)  # on the device: after the pushes
    gate = None
    if failure is None and move.kernel and exchanged.work is not None and not nccl_blocking_wait():
        gate = _gated_commit(move, peer, exchanged)
    try:
        table = exchanged.result(seconds)
    except ExpertMoveError as err:
        if gate is None or gate.close():
            _drop(move, peer, gate)
            raise err from failure
        table = None  # the gate passed on the device: every rank agreed; the commit runs
    timer.lap("transfer")
    why = _verdict(table.tolist()) if table is not None else None
    if why is not None:
        _fail(move, peer, why, failure, gate)
    timer.lap("agree")
    return _commit(move, peer, timer, timer.start, gated=gate is not None)


def nccl_blocking_wait() -> bool:
    """Whether torch's NCCL ``wait()`` blocks the host (``TORCH_NCCL_BLOCKING_WAIT``, or its old
    name ``NCCL_BLOCKING_WAIT``): then a gated commit, which makes its stream wait for the
    exchange, would block the host until the exchange completes -- or until the group's own
    timeout, not the move's -- so the move commits after the answer instead."""
    value = os.environ.get("TORCH_NCCL_BLOCKING_WAIT", os.environ.get("NCCL_BLOCKING_WAIT", ""))
    return value.strip().lower() in ("1", "true", "y", "yes")


def _gated_commit(move: LayerMove, peer: PeerStaging, exchanged: Exchange) -> Gate:
    """Queue ``move``'s commit on the pool's commit stream behind the exchange's all-reduce,
    through a gate that passes exactly when :func:`_verdict` of the exchanged table finds
    nothing wrong (every rank's row equals this rank's, which says ok): the commit starts as
    soon as the ranks agreed on the device, not after the answer reached this host and a
    launch came back. The current stream does not wait for it until the host saw the answer
    (:func:`_commit`), so an exchange that never completes holds up nothing queued after the
    move; the host then closes the gate (:meth:`~eplb.row_copy.Gate.close`)."""
    gate = Gate(exchanged.table, move.comm.rank)
    stream = peer.commit_stream
    stream.wait_stream(torch.cuda.current_stream(move.device))
    with torch.cuda.stream(stream):
        exchanged.work.wait()  # the stream, not the host, waits for the all-reduce
        move.commit(gate)
    return gate


def _verdict(rows: list[list[int]]) -> str | None:
    """What went wrong, from every rank's ``[ok, fingerprint, pushed ahead, region]`` row of a
    move's first exchange (the same on every rank), or None if every rank may go on.

    A rank that pushes ahead sends its row after its pushes, so ``ok`` is also "my transfers
    were posted"; the others send theirs before anything is sent. Every rank must do the same
    (all ahead, staging in the same region, or none ahead)."""
    refused = [r for r, row in enumerate(rows) if not row[0] and not row[2]]
    failed = [r for r, row in enumerate(rows) if not row[0] and row[2]]
    if refused:
        return f"rank(s) {refused} rejected their arguments"
    if any(row[1] != rows[0][1] for row in rows):
        return (
            "the ranks passed different placements or weight layouts (dtype and per-slot shape "
            "of each weight tensor)"
        )
    if any(row[2:] != rows[0][2:] for row in rows):
        return "the ranks' peer staging differs (some made moves that others did not)"
    if failed:
        return f"the transfers failed on rank(s) {failed}"
    return None


def _drop(move: LayerMove, peer: PeerStaging | None, gate: Gate | None = None) -> None:
    """After a failure: drop the move's buffers and retire the staging (every rank does, at
    the same move). A gated commit that did not pass still reads its gate when it runs."""
    move.abandon()
    drop_staging(peer)
    if gate is not None:
        _ABANDONED.append(gate)


def _fail(
    move: LayerMove,
    peer: PeerStaging | None,
    why: str,
    failure: Exception | None,
    gate: Gate | None = None,
) -> NoReturn:
    """Drop the move's buffers and staging and raise :class:`ExpertMoveError` for ``why``."""
    _drop(move, peer, gate)
    raise ExpertMoveError(
        f"layer {move.plan.layer}: {why}"
        + (f" (here: {failure!r})" if failure is not None else "")
        + "; live weights unchanged"
    ) from failure


def _commit(
    move: LayerMove,
    peer: PeerStaging | None,
    timer: PhaseTimer,
    start: float,
    gated: bool = False,
) -> MoveStats:
    """Write the staged rows into the live weights (queued on the current stream); ``gated``:
    the commit is queued already on the pool's commit stream (:func:`_gated_commit`), and the
    current stream now waits for it."""
    if gated:
        torch.cuda.current_stream(move.device).wait_stream(peer.commit_stream)
    else:
        move.commit()
    if peer is not None:
        peer.mark_read(torch.cuda.current_stream(peer.device))
        peer.moves += 1
    move.release()
    timer.lap("commit")
    sent, received, copied = move.stats
    return MoveStats(
        sent, received, copied, time.perf_counter() - start, (move.plan.layer,), timer.phases
    )
