"""Asynchronous, layer-by-layer expert-weight moves that commit between forward passes.

``ExpertMover.start(old, new)`` posts the first layers' transfers into staging buffers (on a side
CUDA stream on GPUs); the forward keeps using the old weights and the old routing. Each
``step()`` -- called on every rank between forward passes -- exchanges which layers are ready
on each rank (a small collective on a CPU group), commits on every rank the same layers (those
ready everywhere, in layer order) and returns their ids, so the caller switches those layers'
routing at the same time. At most ``max_layers_in_flight`` layers hold staging memory.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from eplb.checks import positive_int, process_group
from eplb.move_exec import (
    Comm,
    ExpertMoveError,
    LayerMove,
    MoveStats,
    check_together,
    checked_weights,
    comm_of,
    exchange,
    placement_fingerprint,
    timeout_seconds,
)
from eplb.move_plan import checked_placements, plan_moves

__all__ = ["ExpertMover"]


class _InFlight:
    """A launched layer: its move, and how this rank learns that its transfers completed."""

    def __init__(self, move: LayerMove, deadline: float) -> None:
        self.move, self.deadline = move, deadline
        self.event: torch.cuda.Event | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.finished = False  # set by the waiter thread (CPU backends)

    @property
    def layer(self) -> int:
        return self.move.plan.layer

    def wait_in_thread(self) -> None:
        """CPU backends: gloo's send/recv handles only complete inside ``wait()``, so a thread
        waits for them (the wait releases the GIL)."""

        def run() -> None:
            try:
                self.move.wait(self.deadline)
            except Exception as err:  # reported through step()'s exchange
                self.error = err
            self.finished = True

        self.thread = threading.Thread(target=run, name=f"eplb-move-{self.layer}", daemon=True)
        self.thread.start()

    def state(self) -> int:
        """1 ready, 0 not yet, -1 failed (error, or past the deadline); never blocks."""
        if self.error is not None:
            return -1
        try:
            if self.thread is not None:
                done = self.finished
            else:
                done = (self.event is None or self.event.query()) and self.move.transfers_done()
        except Exception as err:
            self.error = err
            return -1
        if done:
            return 1
        if time.monotonic() > self.deadline:
            self.error = TimeoutError("transfers did not complete within the timeout")
            return -1
        return 0


class ExpertMover:
    """Moves every layer's expert weights to a new placement in the background.

    Collective: construct it, call ``start``, ``step`` and ``abort`` on every rank of the group
    in the same order (``step`` the same number of times), within ``timeout`` of each other.

    Args:
        weights_per_layer: for each layer, this rank's list of contiguous weight tensors
            ``[S, ...]`` (as for :func:`eplb.move_experts`); layers may differ in kinds/shapes.
        group: the expert-parallel process group (None: the default group, or one local rank).
        max_layers_in_flight: layers staged at once (bounds the staging memory; layers that
            move nothing on any rank do not count).
        timeout: seconds (or ``timedelta``) a layer's transfers and each exchange may take.
        control_group: a CPU (gloo) group with the same ranks for the per-step exchange. By
            default ``group`` itself when it has a CPU backend, else a gloo group made here
            (then the constructor is a collective over ``group``'s ranks).
    """

    def __init__(
        self,
        weights_per_layer: Sequence[Sequence[torch.Tensor]],
        group: object = None,
        max_layers_in_flight: int = 1,
        *,
        timeout: float | datetime.timedelta = 60.0,
        control_group: object = None,
    ) -> None:
        if isinstance(weights_per_layer, torch.Tensor) or not isinstance(
            weights_per_layer, Sequence
        ):
            raise TypeError(
                f"weights_per_layer must be a list (one entry per layer) of lists of tensors, "
                f"got {type(weights_per_layer).__name__}"
            )
        if not weights_per_layer:
            raise ValueError("weights_per_layer is empty")
        self._weights = [
            checked_weights(f"weights_per_layer[{i}]", w) for i, w in enumerate(weights_per_layer)
        ]
        self._max = positive_int("max_layers_in_flight", max_layers_in_flight)
        self._timeout = timeout_seconds(timeout)
        devices = {w[0].device for w in self._weights}
        if len(devices) != 1:
            raise ValueError(
                f"all layers' weights must be on one device, got {sorted(map(str, devices))}"
            )
        self._device = devices.pop()
        self._comm = comm_of(group, self._device)
        self._control = self._control_comm(group, control_group)
        if self._comm.flag_device.type == "cuda":
            # NCCL makes its communicator at the first collective, which every rank must join;
            # a layer's transfers may leave a rank out, so make it now (this call is collective).
            exchange(self._comm, [0], self._timeout)
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._plans: list = []
        self._todo: deque[int] = deque()
        self._inflight: deque[_InFlight] = deque()
        self._committed: list[int] = []
        self._totals = [0, 0, 0]
        self._started = 0.0
        self._seconds = 0.0

    def _control_comm(self, group: object, control_group: object) -> Comm:
        """The comm of the per-step exchange: a CPU group with the same ranks, so that it is
        never queued behind the transfers (as a collective of the transfers' NCCL group is)."""
        comm = self._comm
        if control_group is not None:
            process_group("control_group", control_group)
            control = comm_of(control_group)
            if control.global_ranks != comm.global_ranks or control.flag_device.type != "cpu":
                raise ValueError(
                    "control_group must be a CPU (gloo) group with the same ranks as group"
                )
            return control
        on_cpu = comm_of(group)  # the group's own CPU backend, if it has one
        if on_cpu.group is None or on_cpu.flag_device.type == "cpu":
            return on_cpu
        whole = comm.size == dist.get_world_size()
        made = dist.new_group(
            ranks=list(comm.global_ranks),
            backend="gloo",
            timeout=datetime.timedelta(seconds=max(self._timeout, 1.0)),
            use_local_synchronization=not whole,
        )
        return comm_of(made)

    # ----------------------------------------------------------------------------- state
    @property
    def done(self) -> bool:
        """True when no move is in progress (all layers committed, aborted, or never started)."""
        return not self._todo and not self._inflight

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Layers launched (staged or moving) but not committed yet, in order."""
        return tuple(f.layer for f in self._inflight)

    @property
    def pending(self) -> tuple[int, ...]:
        """Layers not committed yet (in flight or waiting), in order."""
        return self.in_flight + tuple(self._todo)

    @property
    def committed(self) -> tuple[int, ...]:
        """Layers committed since the last ``start``, in order."""
        return tuple(self._committed)

    @property
    def stats(self) -> MoveStats:
        """This rank's totals over the layers committed since the last ``start``."""
        sent, received, copied = self._totals
        return MoveStats(sent, received, copied, self._seconds, tuple(self._committed))

    # ----------------------------------------------------------------------------- control
    def start(self, old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> None:
        """Plan every layer's move and post the first layers' transfers.

        Args:
            old_phy2log: [L, R] integer, the placement the weights are in now.
            new_phy2log: [L, R] integer, the target placement (same on every rank).

        Raises:
            RuntimeError: a move is already in progress (``step`` until ``done``, or ``abort``).
            TypeError, ValueError: bad placements on this rank (the others raise
                ``ExpertMoveError``); nothing is posted.
            ExpertMoveError: another rank rejected its arguments, or the ranks passed
                different placements, or the exchange failed.
        """
        if not self.done:
            raise RuntimeError("a move is in progress: call step() until done, or abort()")
        bad, fingerprint, plans = None, 0, []
        try:
            old, new, _, _ = checked_placements(old_phy2log, new_phy2log, self._comm.size)
            if old.shape[0] != len(self._weights) or torch.as_tensor(old_phy2log).dim() != 2:
                raise ValueError(
                    f"old_phy2log/new_phy2log must be [L, R] with L = {len(self._weights)} "
                    f"layers, got shape {tuple(torch.as_tensor(old_phy2log).shape)}"
                )
            plans = plan_moves(old, new, self._comm.size)
            for plan, w in zip(plans, self._weights, strict=True):
                if plan.slots_per_rank != w[0].shape[0]:
                    raise ValueError(
                        f"layer {plan.layer}: the placements give {plan.slots_per_rank} slots "
                        f"per rank but the weights hold {w[0].shape[0]}"
                    )
            fingerprint = placement_fingerprint(old, new)
        except (TypeError, ValueError) as err:
            bad = err
        check_together(self._control, bad, fingerprint, self._timeout)
        self._plans = plans
        self._todo = deque(range(len(plans)))
        self._committed, self._totals, self._seconds = [], [0, 0, 0], 0.0
        self._started = time.perf_counter()
        if self._stream is not None:
            # Transfers read the weights as they are now, after the work already queued.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        self._fill()

    def _fill(self) -> None:
        """Launch layers while fewer than ``max_layers_in_flight`` staged layers are in flight.

        Every rank launches the same layers at the same call (the plans are the same), so the
        transfers of a layer are posted on every rank in the same order.
        """
        while self._todo:
            plan = self._plans[self._todo[0]]
            staged = sum(not f.move.plan.is_noop for f in self._inflight)
            if not plan.is_noop and staged >= self._max:
                return
            self._todo.popleft()
            move = LayerMove(plan, self._weights[plan.layer], self._comm)
            flight = _InFlight(move, time.monotonic() + self._timeout)
            self._inflight.append(flight)
            try:
                if self._stream is None:
                    move.launch()
                    flight.wait_in_thread()
                else:
                    with torch.cuda.stream(self._stream):
                        move.launch()
                        flight.event = torch.cuda.Event()
                        flight.event.record(self._stream)
            except Exception as err:  # reported through step()'s exchange
                flight.error = err

    def step(self) -> list[int]:
        """Commit the layers whose transfers completed on every rank; return their ids.

        Call between forward passes on every rank. The commit copies are queued on the current
        stream, so the next forward sees the new weights of the returned layers (switch their
        routing now) and the old weights of every other layer.

        Raises:
            ExpertMoveError: a layer's transfers failed or timed out on some rank, or the
                exchange failed; raised on every rank (on CPU backends after the in-flight
                transfers settled, by their deadlines). Layers committed earlier stay
                committed, the others keep their old weights; the mover is then done.
        """
        if self.done:
            return []
        ready = 0
        for flight in self._inflight:
            state = flight.state()
            if state < 0:
                ready = -1
                break
            if state == 0:
                break
            ready += 1
        try:
            table = exchange(self._control, [ready], self._timeout)
        except ExpertMoveError:
            self._fail()
            raise
        counts = table[:, 0]
        if (counts < 0).any():
            layer = self._inflight[0].layer
            failed = (counts < 0).nonzero().flatten().tolist()
            local = next((f.error for f in self._inflight if f.error is not None), None)
            self._fail()
            raise ExpertMoveError(
                f"moving layer {layer} or a later one failed on rank(s) {failed}"
                + (f" (here: {local!r})" if local is not None else "")
                + f"; layers {self._committed} were committed, the others keep their old weights"
            ) from local
        committed = []
        for _ in range(int(counts.min())):
            flight = self._inflight.popleft()
            self._commit(flight)
            committed.append(flight.layer)
        self._fill()
        return committed

    def _commit(self, flight: _InFlight) -> None:
        move = flight.move
        if self._stream is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(flight.event)  # the staged copies (already complete)
            move.commit()
            for buf in move.staging:
                buf.record_stream(current)  # freed only after the commit copies ran
        else:
            move.commit()
        move.staging = []
        self._committed.append(flight.layer)
        for i, value in enumerate(move.stats):
            self._totals[i] += value
        self._seconds = time.perf_counter() - self._started

    def _fail(self) -> None:
        """Drop every uncommitted layer. CPU backends: first let the waiter threads finish (by
        their deadlines), so that no transfer is left pending on a buffer that is freed."""
        for flight in self._inflight:
            if flight.thread is not None:
                flight.thread.join(max(flight.deadline - time.monotonic(), 0.0) + 1.0)
            flight.move.abandon()
        self._inflight.clear()
        self._todo.clear()

    def abort(self) -> None:
        """Stop the move: no further layer commits; committed layers stay committed.

        Call on every rank at the same point (between the same ``step`` calls). Nothing live is
        restored because nothing uncommitted was touched. Waits for the transfers already
        posted (they are matched on every rank) so that their buffers can be freed.

        Raises:
            ExpertMoveError: a posted transfer failed or did not finish within the timeout.
        """
        self._todo.clear()
        failure = None
        for flight in self._inflight:
            try:
                if flight.thread is not None:
                    flight.thread.join(max(flight.deadline - time.monotonic(), 0.0) + 1.0)
                    if flight.error is not None or not flight.finished:
                        raise flight.error or TimeoutError("transfers did not finish")
                elif flight.error is not None:
                    raise flight.error
                else:
                    flight.move.wait(flight.deadline)
            except Exception as err:
                failure = failure or err
        self._fail()
        if failure is not None:
            raise ExpertMoveError(f"abort: posted transfers did not finish ({failure!r})") from (
                failure
            )
