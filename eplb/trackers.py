"""Load trackers: per-layer expert load ``[L, E]`` smoothed over training or serving steps.

A tracker is fed one ``counts`` tensor per step (tokens routed to every logical expert of every
MoE layer, ``[L, E]``, integer or float, on any device) and answers ``load()``, a ``[L, E]``
float64 tensor on the same device, the statistics a rebalance runs on.

* :class:`WindowTracker` - sum or mean over the last ``window`` steps (ring buffer, O(1) update).
* :class:`EWMATracker` - exponentially weighted moving average.
* :class:`StageTracker` - separate trackers for the prefill and the decode stage.

Updates never synchronise with the host: state lives on the device of the first counts, every
update is a few device operations, and values are not inspected (a NaN in the counts stays in the
statistics until it leaves the window; :class:`eplb.RebalanceManager` checks the load when it
reads it). Shapes and dtypes are checked on the host, which costs no synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.checks import load_tensor, positive_int, readable

__all__ = ["STAGES", "EWMATracker", "LoadTracker", "StageTracker", "WindowTracker"]

STAGES = ("prefill", "decode")


def _checked_counts(counts: object) -> torch.Tensor:
    """``counts`` as a 2-D real tensor ``[L, E]`` (int or float), else TypeError / ValueError.

    Shape and dtype only: reading the values would synchronise with a GPU.
    """
    c = readable("counts", load_tensor("counts", counts))
    if c.dim() != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"counts must be a non-empty 2-D [layers, experts], got {tuple(c.shape)}")
    return c.detach()


class LoadTracker:
    """Base class: shape/device bookkeeping shared by the trackers.

    Subclasses implement ``_first(c)``, ``_update(c)``, ``_load()``, ``_clear()`` and the
    ``_state`` / ``_set_state`` pair; ``c`` is already on the state device, in the state dtype.
    """

    kind = "base"

    def _state_dtype(self, counts: torch.Tensor) -> torch.dtype:
        """dtype of the state for ``counts``: int64 for integer counts (exact), else float64."""
        return torch.float64 if counts.is_floating_point() else torch.int64

    def __init__(self) -> None:
        self._shape: tuple[int, int] | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._updates = 0

    @property
    def num_updates(self) -> int:
        """Updates since construction or the last :meth:`reset` (a host int)."""
        return self._updates

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(L, E)`` of the counts seen, ``None`` before the first update."""
        return self._shape

    @property
    def device(self) -> torch.device | None:
        """Device holding the state (that of the first counts), ``None`` before it."""
        return self._device

    def update(self, counts: torch.Tensor) -> None:
        """Add one step's counts.

        Args:
            counts: [L, E] int or float tensor, tokens per (layer, logical expert) of one step,
                on any device (moved to the state's device). ``L, E`` and the int/float kind must
                stay the same until :meth:`reset`.
        """
        c = _checked_counts(counts)
        if self._shape is None:
            self._shape = (int(c.shape[0]), int(c.shape[1]))
            self._device = c.device
            self._dtype = self._state_dtype(c)
            self._first(c.to(self._device, self._dtype))
        else:
            if tuple(c.shape) != self._shape:
                raise ValueError(f"counts must have shape {self._shape}, got {tuple(c.shape)}")
            if self._state_dtype(c) != self._dtype:
                raise TypeError(
                    f"counts changed kind: the tracker holds {self._dtype} sums, got {c.dtype}"
                )
            self._update(c.to(self._device, self._dtype))
        self._updates += 1

    def load(self) -> torch.Tensor:
        """The tracked load: [L, E] float64 on the state's device (a new tensor).

        Raises ``ValueError`` before the first update (there is no shape yet).
        """
        if self._shape is None:
            raise ValueError(f"{type(self).__name__} has no counts yet; call update() first")
        return self._load()

    def reset(self) -> None:
        """Forget all counts (and the shape, device and dtype they fixed)."""
        self._shape = self._device = self._dtype = None
        self._updates = 0
        self._clear()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, counters and cloned state tensors."""
        state = {
            "kind": self.kind,
            "shape": self._shape,
            "dtype": None if self._dtype is None else str(self._dtype).removeprefix("torch."),
            "num_updates": self._updates,
        }
        state.update(self._state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a tracker with the same settings.

        Tensors stay on the device they come with (use ``torch.load(map_location=...)`` to move
        them). Raises ``ValueError`` for a state of another tracker kind or other settings.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for a {state.get('kind')!r} tracker, not {self.kind!r}")
        try:
            shape, dtype, updates = state["shape"], state["dtype"], int(state["num_updates"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed tracker state: {err!r}") from None
        self._check_settings(state)
        if shape is None:
            self.reset()
            return
        if dtype not in ("int64", "float64"):
            raise ValueError(f"tracker state dtype must be 'int64' or 'float64', got {dtype!r}")
        self._shape = (int(shape[0]), int(shape[1]))
        self._dtype = getattr(torch, dtype)
        self._updates = updates
        self._device = self._set_state(state)

    # -- subclass hooks -------------------------------------------------------------------------
    def _check_settings(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _first(self, c: torch.Tensor) -> None:
        raise NotImplementedError

    def _update(self, c: torch.Tensor) -> None:
        raise NotImplementedError

    def _load(self) -> torch.Tensor:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> torch.device:
        raise NotImplementedError

    def _checked_state_tensor(self, state: dict[str, Any], key: str, shape: tuple) -> torch.Tensor:
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"tracker state {key!r} must be a tensor of shape {shape}, got {got}")
        return value.to(dtype=self._dtype).clone()


class WindowTracker(LoadTracker):
    """Sum or mean of the counts of the last ``window`` steps.

    State: a ring buffer ``[window, L, E]`` on the device of the first counts; an update
    overwrites the oldest slot, O(L * E) whatever the window.

    * Integer counts: int64 buffer plus an int64 running sum (the update subtracts the slot being
      overwritten and adds the new counts), so sums are exact and :meth:`load` is O(L * E).
    * Float counts: float64 buffer; :meth:`load` sums the buffer (O(window * L * E), normally
      once per rebalance decision). A float running sum would drift by rounding, and an expert
      whose counts dropped to zero could then show a tiny negative load.

    Memory: ``window * L * E * 8`` bytes (1000 steps of 58 x 256 experts: 119 MB).

    Args:
        window: number of most recent steps kept (>= 1).
        reduction: ``"mean"`` (default: sum / steps held, ``min(updates, window)``) or ``"sum"``.
    """

    kind = "window"

    def __init__(self, window: int, *, reduction: str = "mean") -> None:
        super().__init__()
        self.window = positive_int("window", window)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self._clear()

    def _clear(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._total: torch.Tensor | None = None  # running sum, integer counts only
        self._next = 0  # slot the next update writes

    def _first(self, c: torch.Tensor) -> None:
        self._buffer = torch.zeros((self.window, *c.shape), dtype=c.dtype, device=c.device)
        if not c.is_floating_point():
            self._total = torch.zeros_like(c)
        self._update(c)

    def _update(self, c: torch.Tensor) -> None:
        assert self._buffer is not None
        slot = self._next
        if self._total is not None:
            if self._updates >= self.window:
                self._total.sub_(self._buffer[slot])
            self._total.add_(c)
        self._buffer[slot].copy_(c)
        self._next = (slot + 1) % self.window

    def _load(self) -> torch.Tensor:
        assert self._buffer is not None
        # Both branches make a new tensor: the int64 sum is converted, the float one summed.
        total = (self._buffer.sum(0) if self._total is None else self._total).to(torch.float64)
        if self.reduction == "mean":
            total /= min(self._updates, self.window)
        return total

    def _check_settings(self, state: dict[str, Any]) -> None:
        if state.get("window") != self.window or state.get("reduction") != self.reduction:
            raise ValueError(
                f"state is for window={state.get('window')!r}, "
                f"reduction={state.get('reduction')!r}; this tracker has window={self.window}, "
                f"reduction={self.reduction!r}"
            )

    def _state(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "reduction": self.reduction,
            "next": self._next,
            "buffer": None if self._buffer is None else self._buffer.clone(),
            "total": None if self._total is None else self._total.clone(),
        }

    def _set_state(self, state: dict[str, Any]) -> torch.device:
        assert self._shape is not None
        buffer = self._checked_state_tensor(state, "buffer", (self.window, *self._shape))
        total = None
        if self._dtype == torch.int64:
            total = self._checked_state_tensor(state, "total", self._shape).to(buffer.device)
        nxt = state.get("next")
        if isinstance(nxt, bool) or not isinstance(nxt, int) or not 0 <= nxt < self.window:
            raise ValueError(f"tracker state 'next' must be in [0, {self.window}), got {nxt!r}")
        self._buffer, self._total, self._next = buffer, total, nxt
        return buffer.device


class EWMATracker(LoadTracker):
    """Exponentially weighted moving average of the counts.

    The first update sets the average to the counts themselves (no bias towards zero); each later
    one computes ``avg = alpha * counts + (1 - alpha) * avg``. ``alpha = 1`` tracks the last
    counts exactly. State: ``[L, E]`` float64 on the device of the first counts.

    Args:
        alpha: weight of the newest counts, in (0, 1].
    """

    kind = "ewma"

    def __init__(self, alpha: float) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a float, got {alpha!r}")
        if not 0.0 < float(alpha) <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self._clear()

    def _clear(self) -> None:
        self._avg: torch.Tensor | None = None

    def _state_dtype(self, counts: torch.Tensor) -> torch.dtype:
        return torch.float64  # an average is not integral: int and float counts both welcome

    def _first(self, c: torch.Tensor) -> None:
        self._avg = c.clone()

    def _update(self, c: torch.Tensor) -> None:
        assert self._avg is not None
        if self.alpha == 1.0:
            self._avg.copy_(c)  # exact, even after an inf in an earlier step
        else:
            self._avg.mul_(1.0 - self.alpha).add_(c, alpha=self.alpha)

    def _load(self) -> torch.Tensor:
        assert self._avg is not None
        return self._avg.clone()

    def _check_settings(self, state: dict[str, Any]) -> None:
        if state.get("alpha") != self.alpha:
            raise ValueError(f"state is for alpha={state.get('alpha')!r}, not {self.alpha}")

    def _state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "avg": None if self._avg is None else self._avg.clone()}

    def _set_state(self, state: dict[str, Any]) -> torch.device:
        assert self._shape is not None
        self._avg = self._checked_state_tensor(state, "avg", self._shape)
        return self._avg.device


class StageTracker:
    """Prefill and decode statistics kept apart, each in its own tracker.

    Args:
        prefill: tracker for prefill steps (default ``EWMATracker(0.15)``).
        decode: tracker for decode steps (default ``EWMATracker(0.05)``: decode load changes
            slowly, so it is smoothed more).
    """

    kind = "stage"

    def __init__(self, prefill: LoadTracker | None = None, decode: LoadTracker | None = None):
        trackers = {
            "prefill": EWMATracker(0.15) if prefill is None else prefill,
            "decode": EWMATracker(0.05) if decode is None else decode,
        }
        for name, tracker in trackers.items():
            if not isinstance(tracker, LoadTracker):
                raise TypeError(f"{name} must be a LoadTracker, got {type(tracker).__name__}")
        if trackers["prefill"] is trackers["decode"]:
            raise ValueError("prefill and decode must be two different tracker objects")
        self.trackers = trackers

    @staticmethod
    def checked_stage(stage: object) -> str:
        """``stage`` if it is one of :data:`STAGES`, else ``ValueError``."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return str(stage)

    @property
    def num_updates(self) -> int:
        """Updates of both stages together (a host int)."""
        return sum(t.num_updates for t in self.trackers.values())

    def update(self, counts: torch.Tensor, stage: str) -> None:
        """Add one step's counts [L, E] to the tracker of ``stage`` (``"prefill"``/``"decode"``)."""
        self.trackers[self.checked_stage(stage)].update(counts)

    def load(self, stage: str | None = None) -> torch.Tensor:
        """[L, E] float64 load of ``stage``; with ``stage=None`` the sum of the loads of the stages
        that have counts (e.g. one mean prefill step plus one mean decode step).

        Raises ``ValueError`` when the stage asked for (or, for ``None``, every stage) has no
        counts, or when the two stages saw different shapes.
        """
        if stage is not None:
            return self.trackers[self.checked_stage(stage)].load()
        loads = [t.load() for t in self.trackers.values() if t.num_updates]
        if not loads:
            raise ValueError("StageTracker has no counts yet; call update() first")
        if len(loads) == 2 and (loads[0].shape != loads[1].shape):
            raise ValueError(
                f"prefill and decode counts have different shapes {tuple(loads[0].shape)} and "
                f"{tuple(loads[1].shape)}"
            )
        return loads[0] if len(loads) == 1 else loads[0] + loads[1].to(loads[0].device)

    def reset(self) -> None:
        """Reset both stages."""
        for t in self.trackers.values():
            t.reset()

    def state_dict(self) -> dict[str, Any]:
        """The states of both trackers."""
        return {"kind": self.kind, **{k: t.state_dict() for k, t in self.trackers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same tracker kinds and settings per stage)."""
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state is not a StageTracker state (kind {got!r})")
        for name, tracker in self.trackers.items():
            if name not in state:
                raise ValueError(f"StageTracker state lacks the {name!r} tracker")
            tracker.load_state_dict(state[name])
