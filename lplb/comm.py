"""Workload exchange of a Planner with a process group (docs/exchange.md).

Before the LP solve, every EP rank needs the per-expert token counts summed over the group. An
*exchange* is a callable ``(workload [E] int32) -> summed [E] int32`` that is stream-ordered on
the current CUDA stream, capturable in a CUDA graph and traceable by
``torch.compile(fullgraph=True)``; every rank receives bitwise the same sum (integers). All ranks
of the group must call it the same number of times, in the same order, like any collective.

* ``AllReduceExchange``: ``torch.distributed.all_reduce`` (NCCL on GPUs, gloo on CPUs) on a copy;
  functional collectives while ``torch.compile`` traces.
* ``NvshmemExchange``: the device-side NVSHMEM exchange of ``lplb._nvshmem``
  (csrc/lplb/exchange.cu): one kernel stores this rank's counts into every peer's symmetric
  buffer, tagged with the call number (put with signal over a proxy transport such as
  InfiniBand), waits until the peers' counts of this call are there and sums. It needs the
  build option ``LPLB_NVSHMEM`` and a runtime started by ``init_nvshmem_runtime`` (unique-id
  bootstrap over a torch.distributed group) or ``attach_deep_ep`` (the NVSHMEM runtime DeepEP
  started).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

try:
    import torch.distributed._functional_collectives as funcol
except ImportError:  # a torch without distributed support, where no process group exists either
    funcol = None

__all__ = [
    "AllReduceExchange",
    "NvshmemExchange",
    "attach_deep_ep",
    "finalize_nvshmem",
    "init_nvshmem_runtime",
    "nvshmem_available",
]

_INSTALL_HINT = (
    "install NVSHMEM (pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME) and rebuild with "
    "LPLB_NVSHMEM=1 pip install --no-build-isolation --no-deps -e ."
)
# nvshmemx_init_status(): NVSHMEM_STATUS_NOT_INITIALIZED.
_NOT_INITIALIZED = 0


class AllReduceExchange:
    """Sum over ``group`` with ``torch.distributed``: eager ``all_reduce`` on a copy (NCCL runs
    it on its stream, ordered after and before the current stream; capturable in a CUDA graph
    once the communicator exists, i.e. after one eager call), and the functional
    ``all_reduce`` while ``torch.compile`` traces, so that ``fullgraph=True`` holds.

    Args:
        group: the EP process group (any backend that all-reduces the workload's device).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, workload: torch.Tensor) -> torch.Tensor:
        """workload: [E] tokens per expert of this rank -> [E] summed over the group (a new
        tensor; the input is left unchanged)."""
        if torch.compiler.is_compiling():
            return funcol.all_reduce(workload, "sum", self.group)
        summed = workload.clone()
        dist.all_reduce(summed, group=self.group)
        return summed


def _module() -> ModuleType:
    """lplb._nvshmem, or ImportError saying how to get it."""
    try:
        return importlib.import_module("lplb._nvshmem")  # cached in sys.modules after the first
    except ImportError as err:
        raise ImportError(
            f"lplb was built without the NVSHMEM exchange (lplb._nvshmem: {err}); {_INSTALL_HINT}"
        ) from err


def nvshmem_available() -> bool:
    """Whether ``lplb._nvshmem`` (the build option ``LPLB_NVSHMEM``) can be imported."""
    try:
        _module()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Runtime:
    """The NVSHMEM world of this process: PE i is rank i of ``ranks`` (global ranks)."""

    ranks: tuple[int, ...]
    device: int
    attached: bool  # started by another library (DeepEP) rather than by lplb


_runtime: _Runtime | None = None
# Buffers of every NvshmemExchange; the custom op gets an index, so torch.compile sees an int.
_buffers: list[object] = []


def _all_gather(group: dist.ProcessGroup, value: object) -> list[object]:
    out: list[object] = [None] * group.size()
    dist.all_gather_object(out, value, group=group)
    return out


def _current_device() -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("the NVSHMEM exchange needs a CUDA device")
    return torch.cuda.current_device()


def _start(group: dist.ProcessGroup, attach: bool) -> None:
    """Start (or attach to) the NVSHMEM runtime over ``group`` on the current CUDA device and
    check that PE i is rank i of the group. Collective over ``group``."""
    global _runtime
    module = _module()
    ranks = tuple(dist.get_process_group_ranks(group))
    if _runtime is not None:
        if _runtime.ranks != ranks:
            raise RuntimeError(
                f"NVSHMEM already runs over global ranks {list(_runtime.ranks)} in this process; "
                f"it cannot also run over {list(ranks)} (one NVSHMEM world per process)"
            )
        return
    device = _current_device()
    # NVLink multicast (NVLS) stays off: the exchange never needs it, and multicast objects
    # are a scarce resource that other libraries of the process may rely on.
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    # NVSHMEM's own collectives (only used here at start-up, allocation and finalize) need not
    # bring up a second NCCL communicator next to torch's; the user may still opt in.
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    statuses = _all_gather(group, module.init_status())
    started = [s != _NOT_INITIALIZED for s in statuses]
    if attach or any(started):
        if not all(started):
            raise RuntimeError(
                "NVSHMEM is initialised on ranks "
                f"{[r for r, s in zip(ranks, started, strict=True) if s]} but not on the others "
                "of the group (as seen by lplb's libnvshmem_host.so.3)"
            )
        pe, n_pes = module.attach(device)
    else:
        uid = [module.unique_id() if group.rank() == 0 else None]
        dist.broadcast_object_list(uid, src=ranks[0], group=group)
        pe, n_pes = module.init(device, uid[0], group.rank(), group.size())
    pes = _all_gather(group, (pe, n_pes))
    if pes != [(r, group.size()) for r in range(group.size())]:
        raise RuntimeError(
            f"NVSHMEM PEs (pe, n_pes) per group rank are {pes}; the exchange needs PE i to be "
            f"rank i of the {group.size()}-rank group"
        )
    _runtime = _Runtime(ranks, device, attached=attach or any(started))


def init_nvshmem_runtime(group: dist.ProcessGroup) -> None:
    """Start NVSHMEM over ``group`` (unique-id bootstrap: rank 0's id broadcast with
    ``group``), on the current CUDA device; reuse a runtime already started in this process
    over the same ranks (by lplb or another library sharing libnvshmem_host.so.3). Collective.

    Raises:
        ImportError: lplb was built without NVSHMEM.
        RuntimeError: NVSHMEM failed, or already runs over other ranks.
    """
    _start(group, attach=False)


def attach_deep_ep(buffer: object) -> dist.ProcessGroup:
    """Attach to the NVSHMEM runtime a ``deep_ep.Buffer`` started; returns its group.

    DeepEP starts NVSHMEM only for internode or low-latency buffers, and numbers the PEs by
    group rank only in low-latency mode (internode normal mode uses one PE per node); both are
    checked. DeepEP and lplb must load the same shared NVSHMEM host library
    (libnvshmem_host.so.3, e.g. both from the nvidia-nvshmem-cu13 wheel): a statically linked
    NVSHMEM keeps its own state, which lplb cannot see. Collective over the buffer's group.

    Raises:
        ImportError: ``deep_ep`` is not installed, or lplb was built without NVSHMEM.
        TypeError: ``buffer`` is not a ``deep_ep.Buffer``.
        RuntimeError: the buffer did not start NVSHMEM, or its PEs are not the group's ranks.
    """
    try:
        deep_ep = importlib.import_module("deep_ep")
    except ImportError as err:
        raise ImportError(
            f"Planner.init_from_deep_ep needs DeepEP's deep_ep package ({err})"
        ) from err
    if not isinstance(buffer, deep_ep.Buffer):
        raise TypeError(f"buffer must be a deep_ep.Buffer, got {type(buffer).__name__}")
    if not getattr(buffer, "num_rdma_bytes", 0):
        raise RuntimeError(
            "this deep_ep.Buffer has no RDMA buffer (num_rdma_bytes == 0), so DeepEP did not "
            "start NVSHMEM; use Planner.init_nvshmem() instead"
        )
    group = buffer.group
    _start(group, attach=True)
    return group


def finalize_nvshmem() -> None:
    """Finalize lplb's NVSHMEM registration (collective over the NVSHMEM world); call it after
    the last exchange, before the process group is destroyed. No-op without a runtime."""
    global _runtime
    if _runtime is None:
        return
    _module().finalize()
    _runtime = None
    _buffers.clear()


@torch.library.custom_op(
    "lplb::nvshmem_sum",
    mutates_args=("sequence",),
    device_types="cuda",
    schema="(Tensor workload, Tensor(a!) sequence, int handle) -> Tensor",
)
def _nvshmem_sum(workload: torch.Tensor, sequence: torch.Tensor, handle: int) -> torch.Tensor:
    """NVSHMEM exchange kernel: [n] int32 -> [n] int32 summed over the PEs; ``sequence`` ([1]
    int64, this exchange's call counter) is incremented on the device."""
    buffers = _buffers[handle]
    workload = workload.contiguous()
    out = torch.empty_like(workload)
    device = workload.device
    _module().sum(
        device.index,
        buffers,
        workload.data_ptr(),
        out.data_ptr(),
        sequence.data_ptr(),
        torch.cuda.current_stream(device).cuda_stream,
    )
    return out


@_nvshmem_sum.register_fake
def _(workload: torch.Tensor, sequence: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(workload)


class NvshmemExchange:
    """Device-side NVSHMEM sum of [n] int32 workloads over the NVSHMEM world (= the group).

    Allocates its symmetric buffers collectively (every rank must construct it, in the same
    order, with the same n) on the current CUDA device; the runtime must have been started by
    ``init_nvshmem_runtime`` or ``attach_deep_ep``. Each call launches one kernel on the current
    stream; a device-side call counter keeps consecutive calls apart (csrc/lplb/exchange.cu).

    Args:
        group: the group the runtime was started over (used to check n on every rank).
        n: experts per workload (the Planner's E).
        protocol: "auto" (load/store when every peer is reachable by loads and stores, i.e. one
            NVLink or PCIe host, else put with signal) or "put_signal" (always; the protocol
            for peers behind a network, which a single-host test can exercise this way).
            docs/exchange.md, "One call".
    """

    PROTOCOLS = ("auto", "put_signal")

    def __init__(self, group: dist.ProcessGroup, n: int, protocol: str = "auto") -> None:
        if protocol not in self.PROTOCOLS:
            raise ValueError(f"protocol must be one of {self.PROTOCOLS}, got {protocol!r}")
        if _runtime is None:
            raise RuntimeError("NVSHMEM is not started: call init_nvshmem_runtime(group) first")
        sizes, protocols = zip(*_all_gather(group, (n, protocol)), strict=True)
        if len(set(sizes)) != 1:
            raise ValueError(
                f"every rank must exchange the same number of experts, got {list(sizes)}"
            )
        if len(set(protocols)) != 1:
            raise ValueError(f"every rank must use the same protocol, got {list(protocols)}")
        self.group = group
        self.n = n
        self.device = torch.device("cuda", _current_device())
        if self.device.index != _runtime.device:
            raise RuntimeError(
                f"NVSHMEM runs on cuda:{_runtime.device}, but the current device is {self.device}"
            )
        self._ext = _module()
        self.buffers = self._ext.allocate(self.device.index, n, protocol == "auto")
        self.handle = len(_buffers)
        _buffers.append(self.buffers)
        self.sequence = torch.zeros(1, dtype=torch.int64, device=self.device)
        # Zeroed before the first call, whichever stream that call runs on.
        torch.cuda.synchronize(self.device)

    def __call__(self, workload: torch.Tensor) -> torch.Tensor:
        """workload: [n] int32 on this exchange's GPU -> [n] int32 summed over the group."""
        if workload.dtype != torch.int32:
            raise TypeError(
                f"the NVSHMEM exchange sums int32 workloads (count_workload's), got "
                f"{workload.dtype}"
            )
        if workload.shape != (self.n,):
            raise ValueError(f"workload must have shape [{self.n}], got {tuple(workload.shape)}")
        if workload.device != self.device:
            raise ValueError(
                f"workload is on {workload.device}, but the NVSHMEM exchange lives on {self.device}"
            )
        return torch.ops.lplb.nvshmem_sum(workload, self.sequence, self.handle)

    def sum_into(self, workload: int, out: int, stream: int) -> None:
        """Launch the exchange kernel on raw addresses, without a custom-op dispatch: the eager
        fast path's call (lplb/fast_path.py), which has already checked what ``__call__``
        checks.

        Args:
            workload: address of this rank's [n] int32 counts on this exchange's GPU.
            out: address of the [n] int32 result on the same GPU.
            stream: handle of the CUDA stream to launch on.
        """
        sequence = self.sequence.data_ptr()
        self._ext.sum(self.device.index, self.buffers, workload, out, sequence, stream)
