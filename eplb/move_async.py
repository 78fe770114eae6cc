"""Asynchronous, layer-by-layer expert-weight moves that commit between forward passes.

``ExpertMover.start(old, new)`` posts the first layers' transfers into staging buffers (on a side
CUDA stream on GPUs, from a thread of the mover); the forward keeps using the old weights and
the old routing. Each ``step()`` -- called on every rank between forward passes -- posts which
layers are ready on this rank (a small collective on a CPU group, not waited for) and uses the
previous step's: it commits on every rank the same layers (those ready everywhere, in layer
order) and returns their ids, so the caller switches those layers' routing at the same time.
At most ``max_layers_in_flight`` layers hold staging memory.

On one host (``transport="auto"``, the default, or ``"peer"``), senders copy their rows straight
into the receivers' staging (torch symmetric memory, copy engines): no SM moves bytes, but the
copies run at full speed and take memory bandwidth. Over the group (several hosts, or
``transport="group"``), the transfers run on an NCCL communicator of their own, limited to
``max_ctas`` thread blocks (CTAs, one SM each), so that they take few SMs from the model's
kernels.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from eplb.checks import positive_int
from eplb.move_exec import (
    Comm,
    Exchange,
    ExpertMoveError,
    LayerMove,
    MoveStats,
    check_together,
    checked_weights,
    comm_of,
    control_comm,
    exchange,
    expert_bytes,
    flag,
    peer_for,
    placement_fingerprint,
    timeout_seconds,
    transport_choice,
    weights_layout,
)
from eplb.move_peer import PeerStaging, drop_staging
from eplb.move_plan import checked_placements, plan_moves

__all__ = ["ExpertMover"]

# NCCL runs at most this many CTAs (channels) per communicator (its MAXCHANNELS).
MAX_CTAS = 64
DEFAULT_MAX_CTAS = 4


class _InFlight:
    """A launched layer: its move, and how this rank learns that its transfers completed."""

    def __init__(self, move: LayerMove, deadline: float) -> None:
        self.move, self.deadline = move, deadline
        self.launched: Future | None = None  # CUDA: staging and posting, on the launch thread
        self.event: torch.cuda.Event | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.finished = False  # set by the waiter thread (CPU backends)
        self.posted_at = 0.0  # host time (perf_counter) when the transfers were posted
        self.done_at: float | None = None  # host time the waiter thread saw them complete
        # profile=True on CUDA: events (side stream) before staging, after posting, and after
        # the transfers completed (the side stream waits for them).
        self.timing: tuple[torch.cuda.Event, ...] = ()

    @property
    def layer(self) -> int:
        return self.move.plan.layer

    def settle(self) -> None:
        """Wait until the launch thread is done with this layer (its errors are kept)."""
        if self.launched is not None:
            try:
                self.launched.result()
            except Exception as err:
                self.error = self.error or err

    def wait_in_thread(self) -> None:
        """CPU backends: gloo's send/recv handles only complete inside ``wait()``, so a thread
        waits for them (the wait releases the GIL)."""

        def run() -> None:
            try:
                self.move.wait(self.deadline)
                self.done_at = time.perf_counter()
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
            if self.launched is not None and not self.launched.done():
                done = False
            elif self.launched is not None and self.launched.exception() is not None:
                raise self.launched.exception()
            elif self.thread is not None:
                done = self.finished
            else:
                done = (self.event is None or self.event.query()) and self.move.transfers_done()
                done = done and all(e.query() for e in self.timing)
        except Exception as err:
            self.error = err
            return -1
        if done:
            return 1
        if time.monotonic() > self.deadline:
            self.error = TimeoutError("transfers did not complete within the timeout")
            return -1
        return 0


def _nccl_options(max_ctas: int) -> tuple[object | None, str]:
    """``ProcessGroupNCCL.Options`` limiting a communicator to ``max_ctas`` CTAs, or (None, why)
    when this torch build cannot set it."""
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    options = getattr(nccl, "Options", None)
    if options is None:
        return None, "this torch build has no ProcessGroupNCCL.Options"
    opts = options(is_high_priority_stream=False)
    config = getattr(opts, "config", None)
    if config is None or not hasattr(config, "max_ctas") or not hasattr(config, "min_ctas"):
        return None, "this torch build cannot configure NCCL CTAs (NCCL < 2.17)"
    config.min_ctas = 1
    config.max_ctas = max_ctas
    opts.config = config  # in case the attribute handed out a copy
    return opts, ""


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
        max_ctas: NCCL groups moving over the group only: the transfers run on an NCCL
            communicator made here over the same ranks with at most ``max_ctas`` CTAs (1..64;
            NCCL rounds to a power of two), so that they occupy at most that many SMs while the
            model computes; fewer CTAs take fewer SMs but move bytes more slowly. None:
            transfer on ``group`` itself (NCCL picks the CTAs). Ignored on CPU groups and with
            peer staging; see :attr:`transfer_config`.
        transport: "auto" (default), "peer" or "group", as for :func:`eplb.move_experts`:
            on one host peer staging (copy engines, no SMs), else the transfers on
            ``max_ctas`` CTAs of NCCL (docs/moves.md compares the two). With peer
            staging the mover owns a staging buffer of ``max_layers_in_flight`` slots, each
            the largest layer's staging, made at the first ``start`` that needs more (a
            collective rendezvous) and kept; a slot is reused once every rank's commit of its
            previous layer has run (reported through ``step``'s exchange).
        profile: record the GPU time of each layer's staging and transfers with CUDA events
            in ``stats.phases`` (for benchmarks: the side stream then waits for the transfers,
            so after a failed transfer it stays blocked).
    """

    def __init__(
        self,
        weights_per_layer: Sequence[Sequence[torch.Tensor]],
        group: object = None,
        max_layers_in_flight: int = 1,
        *,
        timeout: float | datetime.timedelta = 60.0,
        control_group: object = None,
        max_ctas: int | None = DEFAULT_MAX_CTAS,
        transport: str = "auto",
        profile: bool = False,
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
        self._layout = "|".join(weights_layout(w) for w in self._weights)
        self._max = positive_int("max_layers_in_flight", max_layers_in_flight)
        self._timeout = timeout_seconds(timeout)
        if max_ctas is not None:
            max_ctas = positive_int("max_ctas", max_ctas, maximum=MAX_CTAS)
        self._profile = flag("profile", profile)
        devices = {w[0].device for w in self._weights}
        if len(devices) != 1:
            raise ValueError(
                f"all layers' weights must be on one device, got {sorted(map(str, devices))}"
            )
        self._device = devices.pop()
        self._comm = comm_of(group, self._device)
        self._control = self._control_comm(group, control_group)
        self._transfer_config: dict = {"max_ctas": None, "group": "group"}
        self._mode = transport_choice(transport, self._comm)
        self._peer: PeerStaging | None = peer_for(self._comm, self._mode, self._device, False, 1)
        self._slot_bytes = 0  # peer staging: bytes of one slot (the largest layer's staging)
        self._staged = 0  # layers that moved data launched since start (peer staging slots)
        self._freed = 0  # of those, committed with the commit run on every rank (exchanged)
        self._commits: deque[torch.cuda.Event] = deque()  # this rank's commits still queued
        self._commits_run = 0  # this rank's peer-staged commits that have run
        if self._peer is not None:
            self._transfer_config = {"max_ctas": None, "group": "peer staging (copy engines)"}
            if max_ctas is not None:
                self._transfer_config["note"] = "max_ctas applies to NCCL transfers only"
        elif self._comm.flag_device.type == "cuda":
            self._comm = self._transfer_comm(max_ctas)
            # NCCL makes its communicator at the first collective, which every rank must join;
            # a layer's transfers may leave a rank out, so make it now (this call is collective).
            exchange(self._comm, [0], self._timeout)
        elif max_ctas is not None:
            self._transfer_config["note"] = "max_ctas applies to NCCL groups only"
        # Priority 0 is CUDA's lowest: kernels of higher-priority streams are scheduled first.
        self._stream = (
            torch.cuda.Stream(self._device, priority=0) if self._device.type == "cuda" else None
        )
        # CUDA: one thread stages and posts the layers, in order, so that this host work runs
        # while the caller waits for its forward pass instead of inside step().
        self._launcher = (
            ThreadPoolExecutor(1, thread_name_prefix="eplb-mover") if self._stream else None
        )
        # Cleared while step() runs: the launch thread then parks at its next row instead of
        # competing for the GIL with the caller's thread (step's host time is the model's).
        self._caller_idle = threading.Event()
        self._caller_idle.set()
        self._pending: Exchange | None = None  # the step exchange posted by the last step()
        self._plans: list = []
        self._todo: deque[int] = deque()
        self._inflight: deque[_InFlight] = deque()
        self._committed: list[int] = []
        self._totals = [0, 0, 0]
        self._phases: dict[str, float] = {}
        self._started = 0.0
        self._seconds = 0.0

    def _new_group(self, backend: str, pg_options: object = None) -> object:
        """A new group over the ranks of ``group`` (collective over them)."""
        comm = self._comm
        whole = comm.size == dist.get_world_size()
        kwargs = {} if pg_options is None else {"pg_options": pg_options}
        return dist.new_group(
            ranks=list(comm.global_ranks),
            backend=backend,
            timeout=datetime.timedelta(seconds=max(self._timeout, 1.0)),
            use_local_synchronization=not whole,
            **kwargs,
        )

    def _control_comm(self, group: object, control_group: object) -> Comm:
        """The comm of the per-step exchange: a CPU group with the same ranks, so that it is
        never queued behind the transfers (as a collective of the transfers' NCCL group is)."""
        if control_group is not None:
            return control_comm(self._comm, control_group)
        on_cpu = comm_of(group)  # the group's own CPU backend, if it has one
        if on_cpu.group is None or on_cpu.flag_device.type == "cpu":
            return on_cpu
        return comm_of(self._new_group("gloo"))

    def _transfer_comm(self, max_ctas: int | None) -> Comm:
        """The comm of the transfers: an NCCL group limited to ``max_ctas`` CTAs, or the
        group itself (``max_ctas`` None, or a torch build that cannot limit CTAs)."""
        if max_ctas is None:
            return self._comm
        opts, why = _nccl_options(max_ctas)
        if opts is None:
            self._transfer_config["note"] = why
            return self._comm
        self._transfer_config = {"max_ctas": max_ctas, "group": "own NCCL group"}
        return comm_of(self._new_group("nccl", opts), self._device)

    # ----------------------------------------------------------------------------- state
    @property
    def done(self) -> bool:
        """True when no move is in progress (all layers committed, aborted, or never started)."""
        return not self._todo and not self._inflight and self._pending is None

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
    def transfer_config(self) -> dict:
        """How the transfers run: ``{"max_ctas": int or None, "group": "own NCCL group",
        "group" or "peer staging (copy engines)"}``, plus ``"note"`` when a requested
        ``max_ctas`` was not applied and why."""
        return dict(self._transfer_config)

    @property
    def stats(self) -> MoveStats:
        """This rank's totals over the layers committed since the last ``start``.

        ``phases`` (seconds, summed over layers and steps): host time in "exchange" (posting
        and using the per-step exchange), "launch" (staging, packing and posting in the
        caller's thread: CPU backends; on CUDA only handing layers to the mover's thread),
        "launch_thread" (that thread's staging, packing and posting, CUDA) and "commit"; "transfer"
        from posting to completion as the waiter thread saw it (CPU backends); with
        ``profile=True`` on CUDA the GPU time of "stage_gpu" (staging and packing copies) and
        "transfer_gpu" (posting to completion, peers' delays included). The transfer phases
        count only layers in which this rank sent or received.
        """
        sent, received, copied = self._totals
        return MoveStats(
            sent, received, copied, self._seconds, tuple(self._committed), dict(self._phases)
        )

    def _add(self, phase: str, seconds: float) -> None:
        self._phases[phase] = self._phases.get(phase, 0.0) + seconds

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
                different placements or weight layouts, or the exchange failed.
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
            fingerprint = placement_fingerprint(old, new, f"{self._layout}|{self._mode}")
        except (TypeError, ValueError) as err:
            bad = err
        self._wait_commits()  # every staging slot is free on this rank before the check
        check_together(self._control, bad, fingerprint, self._timeout)
        if self._peer is not None:
            self._slot_bytes = max(
                LayerMove.staging_bytes(plan, expert_bytes(ws))
                for plan, ws in zip(plans, self._weights, strict=True)
            )
            try:
                self._peer.reserve(self._slot_bytes * self._max)
            except Exception as err:
                self._drop_peer()
                raise ExpertMoveError(f"could not make the peer staging buffer ({err!r})") from err
            self._staged = self._freed = self._commits_run = 0
        self._plans = plans
        self._todo = deque(range(len(plans)))
        self._committed, self._totals, self._seconds, self._phases = [], [0, 0, 0], 0.0, {}
        self._started = time.perf_counter()
        if self._stream is not None:
            # Transfers read the weights as they are now, after the work already queued.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        self._fill()

    def _launch(self, flight: _InFlight) -> None:
        """Stage and post one layer: inline on the CPU, else on the launch thread (side
        stream)."""
        move = flight.move
        if self._launcher is None:
            move.launch()
            flight.posted_at = time.perf_counter()
            flight.wait_in_thread()
            return
        flight.launched = self._launcher.submit(self._launch_cuda, flight)

    def _launch_cuda(self, flight: _InFlight) -> None:
        """The launch thread's part: staging, packing or pushing, and posting, queued on the
        side stream."""
        self._pause()
        begin = time.perf_counter()
        move = flight.move
        move.pause = self._pause
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            timing = [torch.cuda.Event(enable_timing=True) for _ in range(3 * self._profile)]
            if timing:
                timing[0].record(self._stream)
            move.stage()
            if timing:
                timing[1].record(self._stream)
            move.post()
            flight.posted_at = time.perf_counter()
            event = torch.cuda.Event()
            event.record(self._stream)
            move.prepare_commit()
            if timing:
                for work in move.works:
                    work.wait()  # the side stream waits for the transfers (profiling only)
                timing[2].record(self._stream)
                flight.timing = tuple(timing)
            flight.event = event
        self._add("launch_thread", time.perf_counter() - begin)

    def _pause(self) -> None:
        """The launch thread, between rows: wait while ``step()`` runs, then let go of the GIL
        for a moment (``time.sleep`` releases it, even for 0 s) for the caller's launches."""
        self._caller_idle.wait()
        time.sleep(0)

    def _fill(self) -> None:
        """Launch layers while fewer than ``max_layers_in_flight`` staged layers are in flight.

        Every rank launches the same layers at the same call (the plans are the same), so the
        transfers of a layer are posted on every rank in the same order.
        """
        begin = time.perf_counter()
        while self._todo:
            plan = self._plans[self._todo[0]]
            staged = sum(not f.move.plan.is_noop for f in self._inflight)
            if not plan.is_noop and staged >= self._max:
                break
            region = 0
            if self._peer is not None and not plan.is_noop:
                # Slot k % max held layer k - max: every rank must have run its commit.
                if self._staged >= self._max and self._staged - self._max >= self._freed:
                    break
                region = (self._staged % self._max) * self._slot_bytes
                self._staged += 1
            self._todo.popleft()
            move = LayerMove(plan, self._weights[plan.layer], self._comm, self._peer, region)
            flight = _InFlight(move, time.monotonic() + self._timeout)
            self._inflight.append(flight)
            try:
                self._launch(flight)
            except Exception as err:  # reported through step()'s exchange
                flight.error = err
        self._add("launch", time.perf_counter() - begin)

    def step(self) -> list[int]:
        """Commit the layers found ready on every rank at the previous step; return their ids.

        Call between forward passes on every rank. Each call posts a small exchange of which
        layers are ready on this rank (and which commits have run) and, without waiting for
        it, uses the one the previous call posted -- the ranks have met it during the forward
        pass in between, so ``step`` does not wait for the slowest rank. The commit copies are
        queued on the current stream, so the next forward sees the new weights of the returned
        layers (switch their routing now) and the old weights of every other layer.

        Raises:
            ExpertMoveError: a layer's transfers failed or timed out on some rank, or the
                exchange failed; raised on every rank (on CPU backends after the in-flight
                transfers settled, by their deadlines). Layers committed earlier stay
                committed, the others keep their old weights; the mover is then done.
        """
        if self.done:
            return []
        self._caller_idle.clear()
        try:
            return self._step()
        finally:
            self._caller_idle.set()

    def _step(self) -> list[int]:
        committed = []
        if self._pending is not None:
            pending, self._pending = self._pending, None  # used once, even if it fails
            committed = self._use(pending)
        self._fill()
        if self._inflight or self._todo:
            ready = 0
            for flight in self._inflight:
                state = flight.state()
                if state < 0:
                    ready = -1
                    break
                if state == 0:
                    break
                ready += 1
            while self._commits and self._commits[0].query():
                self._commits.popleft()
                self._commits_run += 1
            begin = time.perf_counter()
            self._pending = Exchange(self._control, [ready, self._commits_run])
            self._add("exchange", time.perf_counter() - begin)
        return committed

    def _use(self, pending: Exchange) -> list[int]:
        """Act on a step exchange: fail everywhere, or commit the layers ready everywhere."""
        begin = time.perf_counter()
        try:
            table = pending.result(self._timeout)
        except ExpertMoveError:
            self._fail()
            raise
        self._add("exchange", time.perf_counter() - begin)
        rows = table.tolist()  # a few ints: Python is cheaper than tensor ops here
        self._freed = min(commits_run for _, commits_run in rows)
        counts = [ready for ready, _ in rows]
        if min(counts) < 0:
            layer = self._inflight[0].layer
            failed = [rank for rank, ready in enumerate(counts) if ready < 0]
            local = next((f.error for f in self._inflight if f.error is not None), None)
            self._fail()
            raise ExpertMoveError(
                f"moving layer {layer} or a later one failed on rank(s) {failed}"
                + (f" (here: {local!r})" if local is not None else "")
                + f"; layers {self._committed} were committed, the others keep their old weights"
            ) from local
        committed = []
        begin = time.perf_counter()
        for _ in range(min(counts)):
            flight = self._inflight.popleft()
            self._commit(flight)
            committed.append(flight.layer)
        self._add("commit", time.perf_counter() - begin)
        return committed

    def _commit(self, flight: _InFlight) -> None:
        move = flight.move
        if self._stream is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(flight.event)  # the staged copies (already complete)
            move.commit()
            if self._peer is not None and not move.plan.is_noop:
                self._commits.append(torch.cuda.Event())
                self._commits[-1].record(current)  # the slot is free once this has run
            elif move.staging is not None:
                move.staging.record_stream(current)  # freed only after the commit copies ran
            if move.saved is not None:
                move.saved.record_stream(current)
            if flight.timing and move.moves_data:  # all completed (state() waited for them)
                start, posted, end = flight.timing
                self._add("stage_gpu", start.elapsed_time(posted) / 1e3)
                self._add("transfer_gpu", posted.elapsed_time(end) / 1e3)
        else:
            move.commit()
            if flight.done_at is not None and move.moves_data:
                self._add("transfer", flight.done_at - flight.posted_at)
        move.release()
        self._committed.append(flight.layer)
        for i, value in enumerate(move.stats):
            self._totals[i] += value
        self._seconds = time.perf_counter() - self._started

    def _fail(self, drop: bool = True) -> None:
        """Drop every uncommitted layer. CPU backends: first let the waiter threads finish (by
        their deadlines), so that no transfer is left pending on a buffer that is freed."""
        self._caller_idle.set()  # settle() waits for the launch thread, which must not park
        for flight in self._inflight:
            flight.settle()
            if flight.thread is not None:
                flight.thread.join(max(flight.deadline - time.monotonic(), 0.0) + 1.0)
            flight.move.abandon()
        if drop and self._inflight and self._peer is not None:
            self._drop_peer()  # a late push of an abandoned layer must not reach a reused slot
        self._inflight.clear()
        self._todo.clear()

    def _drop_peer(self) -> None:
        """Retire the peer staging buffer (on every rank at the same point); the next
        ``start`` makes a new one."""
        drop_staging(self._peer)
        self._peer = PeerStaging(self._peer.group, self._peer.device, len(self._peer.streams))

    def _wait_commits(self) -> None:
        """Block until this rank's queued commits have run (no slot is being read)."""
        while self._commits:
            self._commits.popleft().synchronize()
            self._commits_run += 1

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
        if self._pending is not None:  # every rank posted it: wait, so the next ones match
            pending, self._pending = self._pending, None
            try:
                pending.result(self._timeout)
            except ExpertMoveError as err:
                failure = err
        for flight in self._inflight:
            flight.settle()
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
        self._fail(drop=failure is not None)
        if failure is not None:
            raise ExpertMoveError(f"abort: posted transfers did not finish ({failure!r})") from (
                failure
            )
