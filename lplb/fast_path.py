"""Eager fast path of ``Planner.run`` on CUDA: one call into the extension per batch.

In eager mode each custom op of lplb/ops.py costs tens of microseconds of host time (dispatch,
argument checks, output allocations), several times the GPU time of its kernels. Outside
tracing, ``Planner.run`` therefore launches count -> solve -> map through one cached
``lplb._C.RunPlan`` per key ``(device index, idx dtype, n_sms, stream, thread)``:

* The first call of a key runs the custom ops, which validate every argument and the layout
  (the single source of truth for checks and shapes), and only then is the plan built, with its
  own workload [E], workload_by_sm [n_sms, E] and probs [n_group, G, D] buffers. A call that
  the ops reject never creates a plan.
* Later calls check only what may differ from the first one (tensor types, avail_counter's
  dtype, device and size, idx contiguity, the thread's current stream), allocate the output and
  launch. Anything unusual falls back to the custom ops, which raise if the input is bad.
* Buffers are reused across calls, which is safe because every kernel that touches them runs on
  the key's stream, in launch order. Different streams or threads get different plans, so calls
  on different streams may overlap. ``update_redundancy_mapping`` drops every plan.
* Tracing (torch.compile, torch.jit.trace, make_fx or any other torch dispatch mode, fake
  tensors or tensor subclasses) and CUDA-graph capture take the custom ops: a captured graph
  then owns its intermediates, so two graphs never share buffers.
Design and measurements: docs/kernels.md, "Eager fast path".
"""

from __future__ import annotations

import _thread
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lplb.planner import Planner

__all__ = ["FastPath", "default_backend"]

_AVAIL_INT64 = {torch.int32: False, torch.int64: True}
_WORKLOAD_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
# Plans are dropped all at once beyond this many keys (streams x threads x dtypes x n_sms), so
# that short-lived threads or streams cannot grow the cache without bound.
MAX_PLANS = 64


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one key of the cache needs per call; the tensors keep the plan's addresses alive.

    Attributes:
        launcher: ``lplb._C.RunPlan`` (or a test double with the same methods).
        idx_int64: whether the key's idx dtype is int64.
        n_logical: E, the length of the workload that ``solve_map`` takes.
        workload: [E] int32; workload_by_sm: [n_sms, E] int32; probs: [n_group, G, D] float32;
            summed: [E] int32, the output of an exchange with ``sum_into``.
        maps: the Planner's device maps the launcher points into.
        error_flag: [1] int32, the Planner's flag for the device.
    """

    launcher: Any
    idx_int64: bool
    n_logical: int
    workload: torch.Tensor
    workload_by_sm: torch.Tensor
    probs: torch.Tensor
    summed: torch.Tensor
    maps: Any
    error_flag: torch.Tensor


def default_backend() -> Any:
    """``lplb._C`` when it was built with CUDA and has ``RunPlan``, else None (no fast path)."""
    from lplb import _C

    if getattr(_C, "has_cuda", False) and hasattr(_C, "RunPlan"):
        return _C
    return None


def _current_raw_stream() -> Callable[[int], int]:
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter
    return lambda device: torch.cuda.current_stream(device).cuda_stream


class FastPath:
    """Cache of launch plans of one Planner (see the module docstring).

    Args:
        backend: module with ``RunPlan`` and ``workload_types`` (``lplb._C``); None disables the
            fast path (every call takes the custom ops).
        stream_of: device index -> current stream handle of the calling thread.
        device_type: "cuda"; tests pass "cpu" with a CPU double of the backend.
    """

    def __init__(
        self,
        backend: Any = None,
        stream_of: Callable[[int], int] | None = None,
        device_type: str = "cuda",
    ) -> None:
        self._backend = backend
        self._stream_arg = stream_of
        self._device_type = device_type
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        self._cuda = device_type == "cuda"
        if stream_of is None:
            stream_of = _current_raw_stream() if self._cuda else (lambda device: 0)
        self._stream_of = stream_of
        self._codes: dict[torch.dtype, int] = {}
        if backend is not None:
            types = backend.workload_types
            self._codes = {
                dt: int(types[str(dt).removeprefix("torch.")]) for dt in _WORKLOAD_DTYPES
            }
        self._plans: dict[tuple, _Plan] = {}

    def __getstate__(self) -> dict:
        # Plans hold device addresses of this process, and a module cannot be pickled or deep
        # copied: a copy starts with an empty cache and looks the extension up again.
        backend = self._backend
        return {
            "backend": "default" if isinstance(backend, types.ModuleType) else backend,
            "stream_of": self._stream_arg,
            "device_type": self._device_type,
        }

    def __setstate__(self, state: dict) -> None:
        backend = state["backend"]
        backend = default_backend() if isinstance(backend, str) else backend
        self.__init__(backend, state["stream_of"], state["device_type"])

    def __len__(self) -> int:
        """Number of cached plans."""
        return len(self._plans)

    def clear(self) -> None:
        """Drop every plan (the layout changed). Pending kernels keep their buffers valid: the
        buffers were allocated on the stream those kernels run on."""
        self._plans.clear()

    def run(
        self, planner: Planner, idx: torch.Tensor, avail_counter: torch.Tensor, n_sms: int | None
    ) -> torch.Tensor:
        """``planner.run(idx, avail_counter, n_sms)``, through a plan when one applies.

        Args and returns as ``Planner.run``; the caller has already excluded torch.compile.
        """
        if (
            self._backend is None
            or type(idx) is not torch.Tensor
            or type(avail_counter) is not torch.Tensor
            or not (idx.is_cuda if self._cuda else idx.is_cpu)
            or (n_sms is not None and type(n_sms) is not int)
            or torch._C._len_torch_dispatch_stack()
            or torch._C._get_tracing_state() is not None
        ):
            return planner._run_ops(idx, avail_counter, n_sms)
        device = idx.get_device()
        stream = self._stream_of(device)
        key = (device, idx.dtype, n_sms, stream, _thread.get_ident())
        plan = self._plans.get(key)
        if plan is None:
            out = planner._run_ops(idx, avail_counter, n_sms)  # validates, raises on bad input
            self._learn(planner, key, idx, n_sms)
            return out
        avail_int64 = _AVAIL_INT64.get(avail_counter.dtype)
        if (
            avail_int64 is None
            or avail_counter.get_device() != device
            or avail_counter.numel() != 1
            or not idx.is_contiguous()
        ):
            return planner._run_ops(idx, avail_counter, n_sms)  # raises if they are bad
        out = torch.empty_like(idx)
        exchange = planner._exchange
        if exchange is None:
            launched = plan.launcher.run(
                idx.data_ptr(),
                plan.idx_int64,
                idx.numel(),
                out.data_ptr(),
                avail_counter.data_ptr(),
                avail_int64,
                stream,
            )
        else:
            launched = self._run_summed(
                plan, exchange, idx, out, avail_counter, avail_int64, stream
            )
        if not launched:  # the stream is being captured into a CUDA graph
            return planner._run_ops(idx, avail_counter, n_sms)
        return out

    def _run_summed(
        self,
        plan: _Plan,
        exchange: Callable[[torch.Tensor], torch.Tensor],
        idx: torch.Tensor,
        out: torch.Tensor,
        avail_counter: torch.Tensor,
        avail_int64: bool,
        stream: int,
    ) -> bool:
        """count -> sum the workload over ranks -> solve and map; False if nothing launched."""
        idx_ptr, n = idx.data_ptr(), idx.numel()
        if not plan.launcher.count(idx_ptr, plan.idx_int64, n, stream):
            return False
        # An exchange that launches on raw addresses (NvshmemExchange) skips a custom-op
        # dispatch, which costs many times its kernel in eager mode.
        sum_into = getattr(exchange, "sum_into", None)
        if sum_into is not None and getattr(exchange, "device", None) == plan.workload.device:
            sum_into(plan.workload.data_ptr(), plan.summed.data_ptr(), stream)
            total = plan.summed
        else:
            total = exchange(plan.workload)
            self._check_exchanged(total, plan)
        plan.launcher.solve_map(
            total.data_ptr(),
            self._codes[total.dtype],
            idx_ptr,
            plan.idx_int64,
            n,
            out.data_ptr(),
            avail_counter.data_ptr(),
            avail_int64,
            stream,
        )
        return True

    @staticmethod
    def _check_exchanged(total: object, plan: _Plan) -> None:
        """The exchange must return a contiguous [E] int/float tensor on the workload's device."""
        if not isinstance(total, torch.Tensor):
            raise TypeError(
                f"the Planner's workload exchange must return a torch.Tensor, got "
                f"{type(total).__name__}"
            )
        if total.dtype not in _WORKLOAD_DTYPES:
            raise TypeError(
                f"the workload exchange returned dtype {total.dtype}; expected one of "
                f"{[str(d) for d in _WORKLOAD_DTYPES]}"
            )
        if (
            total.device != plan.workload.device
            or total.shape != (plan.n_logical,)
            or not total.is_contiguous()
        ):
            raise ValueError(
                f"the workload exchange must return a contiguous [{plan.n_logical}] tensor on "
                f"{plan.workload.device}, got shape {tuple(total.shape)} on {total.device}"
            )

    def _learn(self, planner: Planner, key: tuple, idx: torch.Tensor, n_sms: int | None) -> None:
        """Build the plan of ``key`` after the custom ops accepted this call's arguments."""
        device = idx.device
        if self._cuda:
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    return  # buffers allocated now would belong to the graph being captured
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        if n_sms is None:
            n_sms = planner._default_n_sms(device)
        maps = planner._device_maps(device)
        flag = planner._error_flag(device)
        map_tensors = (maps.phy2log, maps.r2o, maps.o2r, maps.log2phy, maps.prob_index, flag)
        if not all(t.is_contiguous() and t.dtype == torch.int32 for t in map_tensors):
            return  # not expected (the Planner builds them so); keep the custom ops
        n_logical = planner.n_logical
        group_size, n_sets = maps.r2o.shape
        n_local_logical, n_local_routed, n_combined = planner._layout_ints
        n_group = maps.phy2log.numel() // (group_size * n_local_routed)
        workload = torch.empty(n_logical, dtype=torch.int32, device=device)
        workload_by_sm = torch.empty((n_sms, n_logical), dtype=torch.int32, device=device)
        probs = torch.empty((n_group, group_size, n_sets), dtype=torch.float32, device=device)
        summed = torch.empty_like(workload)
        launcher = self._backend.RunPlan(
            device=key[0] if self._cuda else 0,
            n_logical=n_logical,
            n_sms=n_sms,
            workload=workload.data_ptr(),
            workload_by_sm=workload_by_sm.data_ptr(),
            error_flag=flag.data_ptr(),
            probs=probs.data_ptr(),
            n_probs=probs.numel(),
            phy2log=maps.phy2log.data_ptr(),
            n_physical=maps.phy2log.numel(),
            r2o=maps.r2o.data_ptr(),
            o2r=maps.o2r.data_ptr(),
            group_size=group_size,
            n_sets=n_sets,
            n_group=n_group,
            n_local_logical=n_local_logical,
            n_local_routed=n_local_routed,
            n_combined=n_combined,
            log2phy=maps.log2phy.data_ptr(),
            prob_index=maps.prob_index.data_ptr(),
        )
        self._plans[key] = _Plan(
            launcher,
            idx.dtype == torch.int64,
            n_logical,
            workload,
            workload_by_sm,
            probs,
            summed,
            maps,
            flag,
        )
