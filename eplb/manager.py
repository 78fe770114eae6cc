"""RebalanceManager: decides when to rebalance, validates the result, and watches the move.

The manager is fed each step's expert counts. At decision points (every ``interval`` steps,
optionally adapted to how fast the placement degrades) it reads the tracked load, measures the
placement in use, skips when that placement is balanced enough, otherwise runs
``rebalance_experts`` starting from the placement in use, validates the result and proposes it
as a :class:`Rebalance`. Routing keeps using the committed placement (:attr:`phy2log`) until the
caller reports that the expert weights have moved (:meth:`RebalanceManager.commit`); a proposal
that is not committed in time is rolled back. Nothing that goes wrong at run time raises into
the training or serving loop: it is logged and recorded as a :class:`RebalanceEvent`.

Everything the manager does per step is host bookkeeping on Python ints; the tracker update is
asynchronous device work. The load is copied to the host only at decision points.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from eplb.algorithm import POLICIES, rebalance_experts
from eplb.checks import LayoutError, load_tensor, loads, positive_int, tensor
from eplb.maps import as_layers, expert_counts, phy2log_to_log2phy
from eplb.metrics import balancedness, count_duplicate_rows, gpu_loads
from eplb.recommend import check_layout
from eplb.trackers import EWMATracker, LoadTracker, StageTracker

__all__ = [
    "EVENT_KINDS",
    "Rebalance",
    "RebalanceEvent",
    "RebalanceManager",
    "round_robin_phy2log",
]

#: Kinds of :class:`RebalanceEvent`, in the order a run usually meets them.
EVENT_KINDS = (
    "layout",  # first counts: the layout's check_layout report
    "bad_counts",  # counts rejected (shape, dtype, stage); the step is not tracked
    "skip_pending",  # decision point while a rebalance awaits its commit
    "skip_threshold",  # placement in use already balanced enough
    "keep",  # the balancer found no layer it improves
    "fallback",  # statistics, balancer or result invalid: the placement in use stays
    "rebalance",  # a new placement is proposed (returned by step())
    "commit",  # the caller moved the weights; routing switches to the new placement
    "cancel",  # the caller gave up the move
    "rollback",  # watchdog: no commit in time; routing stays on the old placement
    "stale_commit",  # commit of a rebalance that is not pending (rolled back, unknown)
    "restore",  # load_state_dict
    "error",  # unexpected internal error, caught
)
_WARN = frozenset({"bad_counts", "fallback", "cancel", "rollback", "stale_commit", "error"})
# Imbalance changes smaller than this count as "no change" for the adaptive interval, so that
# rounding noise on a perfectly balanced placement neither halves nor blocks doubling.
_ADAPT_EPS = 1e-9


@dataclass(frozen=True)
class RebalanceEvent:
    """One decision or report of a :class:`RebalanceManager`.

    Attributes:
        step: manager step (number of ``step()`` calls so far) at which it happened.
        kind: one of :data:`EVENT_KINDS`.
        reason: human-readable explanation.
        balancedness_before: mean over layers of the balancedness of the placement in use under
            the tracked load (decision events), else ``None``.
        balancedness_after: the same for the placement proposed or kept, else ``None``.
        interval: the decision interval after this event.
        rebalance_id: id of the :class:`Rebalance` concerned, if any.
        num_changed: slots that change expert (rebalance / commit / rollback events).
        time: wall-clock time (``time.time()``).
    """

    step: int
    kind: str
    reason: str
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    interval: int | None = None
    rebalance_id: int | None = None
    num_changed: int | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Rebalance:
    """A proposed placement change. All tensors are on the CPU.

    Attributes:
        id: sequence number within the manager.
        step: manager step that proposed it.
        old_phy2log: [L, R] int64, the placement in use when it was proposed.
        new_phy2log: [L, R] int64, the proposed placement (layers that would not improve keep
            their old row).
        log2phy: [L, E, X] int64 and logcnt: [L, E] int64 of ``new_phy2log``.
        changed: [L, R] bool, slots whose expert changes (their weights must be loaded).
        balancedness_before: [L] float64, old placement under the tracked load.
        balancedness_after: [L] float64, new placement under the same load.
        load: [L, E] float64, the tracked load the decision used.
    """

    id: int
    step: int
    old_phy2log: torch.Tensor
    new_phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    changed: torch.Tensor
    balancedness_before: torch.Tensor
    balancedness_after: torch.Tensor
    load: torch.Tensor

    @property
    def num_changed(self) -> torch.Tensor:
        """[L] int64, changed slots per layer."""
        return self.changed.sum(1)

    @property
    def changed_slots(self) -> list[torch.Tensor]:
        """Per layer, the [k] int64 indices of the slots whose expert changes."""
        return [row.nonzero().flatten() for row in self.changed]


def round_robin_phy2log(num_layers: int, num_experts: int, num_replicas: int) -> torch.Tensor:
    """Even placement without statistics: slot ``p`` holds expert ``p % E``; [L, R] int64."""
    return (torch.arange(num_replicas, dtype=torch.int64) % num_experts).repeat(num_layers, 1)


def _optional_positive_float(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


class RebalanceManager:
    """Runtime loop around ``rebalance_experts``: when to rebalance, what to propose, and what
    happens when the weight move never finishes.

    Args:
        initial_phy2log: [L, R] integer placement in use at start (-1 = unused slot), or
            ``None``: round robin (slot ``p`` holds expert ``p % E``), built at the first counts.
        num_replicas: R, physical experts per layer.
        num_groups, num_nodes, num_gpus: layout, as for ``rebalance_experts``.
        policy: ``"balanced"`` (default; keeps experts in place via ``old_phy2log`` and never
            puts an expert twice on a GPU) or ``"deepseek"``.
        tracker: a :class:`~eplb.LoadTracker` or :class:`~eplb.StageTracker`; default
            ``EWMATracker(2 / (interval + 1))`` (an EWMA spanning about one interval).
        load_stage: for a ``StageTracker``, the stage whose load drives decisions (``None``:
            both stages summed).
        interval: steps between decision points.
        adaptive: adapt the interval at each decision point: halve it (down to
            ``min_interval``) when the imbalance ``1 - mean balancedness`` of the placement in
            use has grown by more than ``grow_factor`` since the last decision, double it (up to
            ``max_interval``) when it grew by at most ``stable_factor``.
        min_interval, max_interval: bounds of the adaptive interval (default ``interval // 8``
            and ``interval * 8``).
        grow_factor, stable_factor: ``1 <= stable_factor <= grow_factor``.
        threshold: skip the rebalance when the mean balancedness of the placement in use under
            the tracked load is at least this (in (0, 1]); ``None``: never skip.
        watchdog_steps, watchdog_seconds: roll a proposal back when it is not committed within
            this many steps / seconds (``None`` disables that limit).
        on_event: called with every :class:`RebalanceEvent` (exceptions it raises are logged).
        logger: where events are logged (default ``logging.getLogger("eplb.manager")``).
        clock: monotonic seconds for the watchdog (default ``time.monotonic``).
        max_events: most recent events kept in :attr:`events`.

    Raises:
        TypeError / ValueError: bad arguments (``LayoutError`` for an impossible layout).
    """

    def __init__(
        self,
        initial_phy2log: torch.Tensor | None,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        *,
        policy: str = "balanced",
        tracker: LoadTracker | StageTracker | None = None,
        load_stage: str | None = None,
        interval: int = 1000,
        adaptive: bool = False,
        min_interval: int | None = None,
        max_interval: int | None = None,
        grow_factor: float = 1.2,
        stable_factor: float = 1.05,
        threshold: float | None = None,
        watchdog_steps: int | None = None,
        watchdog_seconds: float | None = 600.0,
        on_event: Callable[[RebalanceEvent], None] | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 10000,
    ) -> None:
        self.num_replicas = positive_int("num_replicas", num_replicas)
        self.num_groups = positive_int("num_groups", num_groups)
        self.num_nodes = positive_int("num_nodes", num_nodes)
        self.num_gpus = positive_int("num_gpus", num_gpus)
        if self.num_replicas % self.num_gpus:
            raise LayoutError(
                f"num_replicas={self.num_replicas} is not a multiple of num_gpus={self.num_gpus}"
            )
        if self.num_gpus % self.num_nodes:
            raise LayoutError(
                f"num_gpus={self.num_gpus} is not a multiple of num_nodes={self.num_nodes}"
            )
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy

        self.interval = positive_int("interval", interval)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.min_interval = positive_int(
            "min_interval", max(1, self.interval // 8) if min_interval is None else min_interval
        )
        self.max_interval = positive_int(
            "max_interval", self.interval * 8 if max_interval is None else max_interval
        )
        if not self.min_interval <= self.interval <= self.max_interval:
            raise ValueError(
                f"need min_interval <= interval <= max_interval, got {self.min_interval}, "
                f"{self.interval}, {self.max_interval}"
            )
        if grow_factor is None or stable_factor is None:
            raise TypeError("grow_factor and stable_factor must be numbers, not None")
        self.grow_factor = _optional_positive_float("grow_factor", grow_factor) or 0.0
        self.stable_factor = _optional_positive_float("stable_factor", stable_factor) or 0.0
        if not 1.0 <= self.stable_factor <= self.grow_factor:
            raise ValueError(
                f"need 1 <= stable_factor <= grow_factor, got {self.stable_factor}, "
                f"{self.grow_factor}"
            )
        self.threshold = _optional_positive_float("threshold", threshold)
        if self.threshold is not None and self.threshold > 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.watchdog_steps = (
            None if watchdog_steps is None else positive_int("watchdog_steps", watchdog_steps)
        )
        self.watchdog_seconds = _optional_positive_float("watchdog_seconds", watchdog_seconds)

        if tracker is None:
            tracker = EWMATracker(2.0 / (self.interval + 1))
        if not isinstance(tracker, (LoadTracker, StageTracker)):
            raise TypeError(
                f"tracker must be a LoadTracker or StageTracker, got {type(tracker).__name__}"
            )
        if load_stage is not None:
            if not isinstance(tracker, StageTracker):
                raise ValueError("load_stage needs a StageTracker")
            StageTracker.checked_stage(load_stage)
        self.tracker = tracker
        self.load_stage = load_stage
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        self.on_event = on_event
        self.logger = logging.getLogger("eplb.manager") if logger is None else logger
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self._clock = clock
        self._events: deque[RebalanceEvent] = deque(maxlen=positive_int("max_events", max_events))

        self._current: torch.Tensor | None = None
        self._log2phy: torch.Tensor | None = None
        self._logcnt: torch.Tensor | None = None
        if initial_phy2log is not None:
            if tensor("initial_phy2log", initial_phy2log).dim() != 2:
                raise ValueError(
                    f"initial_phy2log must be [L, R], got {tuple(initial_phy2log.shape)}"
                )
            current = as_layers(initial_phy2log, "initial_phy2log")
            if current.shape[1] != self.num_replicas:
                raise ValueError(
                    f"initial_phy2log has {current.shape[1]} slots per layer, not "
                    f"num_replicas={self.num_replicas}"
                )
            self._current = current.clone()
        self._num_experts: int | None = None
        self._step = 0
        self._last_decision = 0
        self._reference: float | None = None  # imbalance after the last decision
        self._next_id = 0
        self._pending: Rebalance | None = None
        self._pending_since = 0.0

    # ---------------------------------------------------------------------------- properties
    @property
    def phy2log(self) -> torch.Tensor | None:
        """[L, R] int64 (CPU), the committed placement routing must use; ``None`` only before
        the first counts when no initial placement was given."""
        return self._current

    @property
    def log2phy(self) -> torch.Tensor | None:
        """[L, E, X] int64 of :attr:`phy2log` (``None`` until the expert count is known)."""
        self._ensure_inverse()
        return self._log2phy

    @property
    def logcnt(self) -> torch.Tensor | None:
        """[L, E] int64 copies per expert of :attr:`phy2log` (``None`` until E is known)."""
        self._ensure_inverse()
        return self._logcnt

    @property
    def pending(self) -> Rebalance | None:
        """The proposed rebalance awaiting :meth:`commit`, if any."""
        return self._pending

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far (restored by :meth:`load_state_dict`)."""
        return self._step

    @property
    def events(self) -> list[RebalanceEvent]:
        """The most recent events, oldest first."""
        return list(self._events)

    # ------------------------------------------------------------------------------ main API
    def step(self, counts: torch.Tensor, stage: str | None = None) -> Rebalance | None:
        """Feed one step's counts; at a decision point maybe propose a rebalance.

        Args:
            counts: [L, E] int or float tensor on any device, tokens routed to each logical
                expert of each layer in this step (not inspected on the host: no sync).
            stage: ``"prefill"`` / ``"decode"`` for a ``StageTracker`` (ignored otherwise).

        Returns:
            A new :class:`Rebalance` to carry out (move the weights of ``changed`` slots, then
            :meth:`commit`), or ``None``. Never raises: problems become events.
        """
        try:
            self._step += 1
            self._feed(counts, stage)
            self._check_watchdog()
            if self._step - self._last_decision >= self.interval:
                return self._decide()
        except Exception as err:  # never into the training loop
            self._emit("error", f"unexpected error in step(): {err!r}")
        return None

    def commit(self, rebalance: Rebalance) -> bool:
        """Report that the weights of ``rebalance`` are in place: routing switches to it.

        Returns:
            ``True`` if it was the pending rebalance (now :attr:`phy2log`); ``False`` if it is
            not pending (rolled back by the watchdog, cancelled, already committed, or unknown):
            routing stays on :attr:`phy2log`, so weights moved for it must be moved back
            (``rebalance.old_phy2log`` says where they were).
        """
        if not isinstance(rebalance, Rebalance):
            raise TypeError(f"rebalance must be a Rebalance, got {type(rebalance).__name__}")
        pending = self._pending
        if pending is None or pending.id != rebalance.id:
            self._emit(
                "stale_commit",
                f"rebalance {rebalance.id} is not pending; routing stays on the current "
                "placement, restore its weights",
                rebalance_id=rebalance.id,
            )
            return False
        self._pending = None
        self._set_current(pending.new_phy2log, pending.log2phy, pending.logcnt)
        self._emit(
            "commit",
            f"rebalance {pending.id} committed after {self._step - pending.step} steps",
            balancedness_before=float(pending.balancedness_before.mean()),
            balancedness_after=float(pending.balancedness_after.mean()),
            rebalance_id=pending.id,
            num_changed=int(pending.changed.sum()),
        )
        return True

    def cancel(self, rebalance: Rebalance, reason: str = "") -> bool:
        """Give up the pending ``rebalance`` (e.g. its weight move failed); returns whether it
        was pending. Routing stays on :attr:`phy2log`."""
        if not isinstance(rebalance, Rebalance):
            raise TypeError(f"rebalance must be a Rebalance, got {type(rebalance).__name__}")
        if self._pending is None or self._pending.id != rebalance.id:
            return False
        self._pending = None
        self._emit(
            "cancel",
            f"rebalance {rebalance.id} cancelled" + (f": {reason}" if reason else ""),
            rebalance_id=rebalance.id,
        )
        return True

    # ----------------------------------------------------------------------------- internals
    def _emit(self, kind: str, reason: str, *, warn: bool = False, **fields: Any) -> RebalanceEvent:
        assert kind in EVENT_KINDS, kind
        event = RebalanceEvent(self._step, kind, reason, interval=self.interval, **fields)
        self._events.append(event)
        level = logging.WARNING if warn or kind in _WARN else logging.INFO
        self.logger.log(level, "eplb step %d %s: %s", self._step, kind, reason)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as err:
                self.logger.warning("eplb on_event callback failed: %r", err)
        return event

    def _ensure_inverse(self) -> None:
        if self._log2phy is None and self._current is not None and self._num_experts:
            self._log2phy, self._logcnt = phy2log_to_log2phy(self._current, self._num_experts)

    def _set_current(
        self,
        phy2log: torch.Tensor,
        log2phy: torch.Tensor | None = None,
        logcnt: torch.Tensor | None = None,
    ) -> None:
        self._current = phy2log
        self._log2phy, self._logcnt = log2phy, logcnt

    def _feed(self, counts: object, stage: str | None) -> None:
        """Shape checks against the placement (host only), then the tracker update."""
        try:
            c = load_tensor("counts", counts)
            if c.dim() != 2:
                raise ValueError(f"counts must be [L, E], got shape {tuple(c.shape)}")
            num_layers, num_experts = int(c.shape[0]), int(c.shape[1])
            if num_layers == 0 or num_experts == 0:
                raise ValueError(f"counts must be non-empty, got shape {tuple(c.shape)}")
            if self._num_experts is None:
                self._first_counts(num_layers, num_experts)
            elif num_experts != self._num_experts:
                raise ValueError(f"counts have {num_experts} experts, not {self._num_experts}")
            assert self._current is not None
            if num_layers != self._current.shape[0]:
                raise ValueError(
                    f"counts have {num_layers} layers, the placement {self._current.shape[0]}"
                )
            if isinstance(self.tracker, StageTracker):
                self.tracker.update(c, stage=stage)  # type: ignore[arg-type]
            else:
                self.tracker.update(c)
        except (TypeError, ValueError) as err:
            self._emit("bad_counts", f"counts ignored: {err}")

    def _first_counts(self, num_layers: int, num_experts: int) -> None:
        if self._current is None:
            if num_experts > self.num_replicas:
                raise ValueError(
                    f"counts have {num_experts} experts, more than num_replicas={self.num_replicas}"
                )
            self._set_current(round_robin_phy2log(num_layers, num_experts, self.num_replicas))
        elif self._current.numel() and int(self._current.max()) >= num_experts:
            raise ValueError(
                f"counts have {num_experts} experts but the placement holds expert "
                f"{int(self._current.max())}"
            )
        self._num_experts = num_experts
        report = check_layout(
            num_experts,
            self.num_replicas,
            self.num_groups,
            self.num_nodes,
            self.num_gpus,
            policy=self.policy,
        )
        if report.errors or report.warnings:
            self._emit("layout", str(report).replace("\n", "; "), warn=bool(report.errors))

    def _check_watchdog(self) -> None:
        pending = self._pending
        if pending is None:
            return
        age_steps = self._step - pending.step
        age_seconds = self._clock() - self._pending_since
        why = None
        if self.watchdog_steps is not None and age_steps > self.watchdog_steps:
            why = f"not committed within {self.watchdog_steps} steps"
        elif self.watchdog_seconds is not None and age_seconds > self.watchdog_seconds:
            why = f"not committed within {self.watchdog_seconds:g} s ({age_seconds:.1f} s)"
        if why is None:
            return
        self._pending = None
        self._emit(
            "rollback",
            f"rebalance {pending.id} {why}: rolled back, routing stays on the old placement; "
            "abort its weight move",
            rebalance_id=pending.id,
            num_changed=int(pending.changed.sum()),
        )

    def _read_load(self) -> torch.Tensor:
        """The tracked load as CPU float64 [L, E] (the one host sync of a decision)."""
        if isinstance(self.tracker, StageTracker):
            load = self.tracker.load(self.load_stage)
        else:
            load = self.tracker.load()
        return load.detach().to("cpu", torch.float64)

    def _validation_problems(self, new: object, num_layers: int) -> list[str]:
        """Why ``new`` (a balancer result) cannot be used; empty when it can."""
        shape = (num_layers, self.num_replicas)
        if not isinstance(new, torch.Tensor):
            return [f"phy2log is a {type(new).__name__}, not a tensor"]
        if new.dtype != torch.int64 or tuple(new.shape) != shape:
            return [f"phy2log is {new.dtype} {tuple(new.shape)}, expected int64 {shape}"]
        assert self._num_experts is not None
        problems = []
        low, high = int(new.min()), int(new.max())
        if low < 0 or high >= self._num_experts:
            problems.append(f"expert ids span [{low}, {high}], outside [0, {self._num_experts})")
            return problems
        missing = (expert_counts(new, self._num_experts) == 0).any(1).nonzero().flatten()
        if missing.numel():
            problems.append(f"layers {missing.tolist()} leave some expert without a slot")
        if self.policy == "balanced":
            repeats = count_duplicate_rows(new, self.num_gpus)
            if repeats:
                problems.append(f"{repeats} GPU rows hold an expert twice (policy 'balanced')")
        return problems

    def _adapt(self, imbalance: float) -> str:
        """Adaptive interval update from the imbalance of the placement in use; a note."""
        ref = self._reference
        if not self.adaptive or ref is None:
            return ""
        old = self.interval
        if imbalance > self.grow_factor * ref and imbalance - ref > _ADAPT_EPS:
            self.interval = max(self.min_interval, self.interval // 2)
        elif imbalance <= self.stable_factor * ref + _ADAPT_EPS:
            self.interval = min(self.max_interval, self.interval * 2)
        if self.interval == old:
            return ""
        return f"; interval {old} -> {self.interval} (imbalance {ref:.4g} -> {imbalance:.4g})"

    def _fallback(self, reason: str, before: torch.Tensor | None) -> None:
        bal = None if before is None else float(before.mean())
        self._emit(
            "fallback",
            f"{reason}; keeping the placement in use",
            balancedness_before=bal,
            balancedness_after=bal,
        )

    def _decide(self) -> Rebalance | None:
        self._last_decision = self._step
        if self._pending is not None:
            self._emit("skip_pending", f"rebalance {self._pending.id} awaits its commit")
            return None
        if self._current is None or self._num_experts is None or not self.tracker.num_updates:
            return None  # no valid counts yet: nothing to decide on
        current = self._current
        try:
            load = self._read_load()
        except Exception as err:
            self._fallback(f"cannot read the tracked load: {err}", None)
            return None
        if tuple(load.shape) != (current.shape[0], self._num_experts):
            self._fallback(f"tracked load has shape {tuple(load.shape)}", None)
            return None
        try:
            loads("tracked load", load, ndim=2)  # finite and non-negative
        except ValueError as err:
            self._fallback(f"bad statistics: {err}", None)
            return None

        before = balancedness(gpu_loads(load, current, self.num_gpus))
        mean_before = float(before.mean())
        note = self._adapt(1.0 - mean_before)
        if self.threshold is not None and mean_before >= self.threshold:
            self._reference = 1.0 - mean_before
            self._emit(
                "skip_threshold",
                f"balancedness {mean_before:.4f} >= threshold {self.threshold:g}{note}",
                balancedness_before=mean_before,
                balancedness_after=mean_before,
            )
            return None

        self._reference = 1.0 - mean_before  # kept unless a proposal replaces it below
        try:
            old = current if self.policy == "balanced" else None
            new = rebalance_experts(
                load,
                self.num_replicas,
                self.num_groups,
                self.num_nodes,
                self.num_gpus,
                policy=self.policy,
                old_phy2log=old,
            )[0]
            problems = self._validation_problems(new, current.shape[0])
        except Exception as err:
            self._fallback(f"rebalance_experts failed: {err!r}{note}", before)
            return None
        if problems:
            why = "invalid placement from the balancer: " + "; ".join(problems)
            self._fallback(why + note, before)
            return None

        after_new = balancedness(gpu_loads(load, new, self.num_gpus))
        # Per layer, a new row only where it is strictly better: moving weights for an equal
        # balance would cost a transfer for nothing.
        better = after_new > before
        proposed = torch.where(better[:, None], new, current)
        after = torch.where(better, after_new, before)
        changed = proposed != current
        if not bool(changed.any()):
            self._emit(
                "keep",
                f"no layer improves on balancedness {mean_before:.4f}{note}",
                balancedness_before=mean_before,
                balancedness_after=mean_before,
            )
            return None
        log2phy, logcnt = phy2log_to_log2phy(proposed, self._num_experts)
        rebalance = Rebalance(
            id=self._next_id,
            step=self._step,
            old_phy2log=current.clone(),
            new_phy2log=proposed,
            log2phy=log2phy,
            logcnt=logcnt,
            changed=changed,
            balancedness_before=before,
            balancedness_after=after,
            load=load,
        )
        self._next_id += 1
        self._pending = rebalance
        self._pending_since = self._clock()
        self._reference = 1.0 - float(after.mean())
        self._emit(
            "rebalance",
            f"rebalance {rebalance.id}: {int(better.sum())} of {len(better)} layers improve, "
            f"{int(changed.sum())} slots change{note}",
            balancedness_before=mean_before,
            balancedness_after=float(after.mean()),
            rebalance_id=rebalance.id,
            num_changed=int(changed.sum()),
        )
        return rebalance

    # -------------------------------------------------------------------------- checkpointing
    def _config(self) -> dict[str, Any]:
        return {
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
            "num_nodes": self.num_nodes,
            "num_gpus": self.num_gpus,
            "policy": self.policy,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters, interval, committed placement, tracker.

        A pending rebalance is not saved: after a restart the weights are those of the
        committed placement, and the next decision point proposes again.
        """
        return {
            "version": 1,
            "config": self._config(),
            "step": self._step,
            "last_decision": self._last_decision,
            "interval": self.interval,
            "reference": self._reference,
            "next_id": self._next_id,
            "num_experts": self._num_experts,
            "phy2log": None if self._current is None else self._current.clone(),
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output of a manager with the same layout and policy.

        Raises ``ValueError`` for a state of another layout, policy or tracker kind.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a RebalanceManager state (version 1)")
        if state.get("config") != self._config():
            raise ValueError(
                f"state is for {state.get('config')}, this manager has {self._config()}"
            )
        try:
            step, last = int(state["step"]), int(state["last_decision"])
            interval, next_id = int(state["interval"]), int(state["next_id"])
            num_experts = state["num_experts"]
            reference = state["reference"]
            phy2log = state["phy2log"]
            tracker_state = state["tracker"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed RebalanceManager state: {err!r}") from None
        if phy2log is not None:
            phy2log = as_layers(tensor("state['phy2log']", phy2log), "state['phy2log']")
            if phy2log.shape[1] != self.num_replicas:
                raise ValueError(f"state placement has {phy2log.shape[1]} slots per layer")
        self.tracker.load_state_dict(tracker_state)
        self._step, self._last_decision, self.interval = step, last, interval
        self._next_id = next_id
        self._num_experts = None if num_experts is None else int(num_experts)
        self._reference = None if reference is None else float(reference)
        self._pending = None
        self._set_current(phy2log)
        self._emit("restore", f"resumed at step {step}, interval {interval}")
