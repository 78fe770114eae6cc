"""LPLB Planner: per-batch LP balancing of replicated experts (DeepSeek LPLB `Planner` API).

The Planner owns the physical layout (which logical expert sits in which physical slot, and
which slots are copies of which) and drives the three custom ops of lplb/ops.py:
count tokens -> (all-reduce over the EP group) -> solve one LP per group -> map tokens (eager
CUDA calls launch the same kernels through the cached native call of lplb/fast_path.py).
The layout arithmetic lives in lplb/layout.py. Layout maps are kept on the CPU and copied to a
tensor's device on first use, so that `run` has no host synchronisation and no data-dependent
Python control flow (CUDA graphs, torch.compile(fullgraph=True)). Intentional differences from
DeepSeek LPLB are listed in docs/lplb.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb.checks import int_tensor, load_tensor, positive_int, process_group, tensor
from lplb import comm, ops
from lplb.fast_path import FastPath, default_backend
from lplb.layout import expert_order, redundancy_layout
from lplb.topology import validate_r2o

__all__ = ["Planner"]

# Chunks used to count a CPU idx; the mapping result does not depend on it.
CPU_N_SMS = 8


@dataclass(frozen=True)
class _DeviceMaps:
    """Layout maps in the dtypes the ops take, on one device.

    Attributes:
        phy2log: [R] int32; r2o, o2r: [G, D] int32; log2phy: [E, 2] int32;
        prob_index: [E] int32.
    """

    phy2log: torch.Tensor
    r2o: torch.Tensor
    o2r: torch.Tensor
    log2phy: torch.Tensor
    prob_index: torch.Tensor


class Planner:
    """Balances each batch's tokens between the originals and copies of replicated experts.

    Args:
        redundant_to_original: [group_size, D] integer topology (lplb.topology): rank r's d-th
            redundant slot set holds copies of rank r2o[r, d]'s d-th replicated set. Its device
            is where the public maps (r2o, o2r, phy2log, log2phy, logcnt) are kept.
        n_routed_experts: physical experts R over all EP ranks (originals + copies).
        n_logical_routed_experts: logical experts E.
        ep_size: EP ranks; defaults to group.size() if a group is given, else group_size.
        group: torch.distributed process group over which workloads are summed before solving
            (also available as ``ep_group``, DeepSeek LPLB's name).
        num_nodes: nodes the EP ranks span, used when a load history reorders experts
            (``update_redundancy_mapping``): expert groups are kept on nodes. Default, as DeepSeek
            LPLB: ``max(1, ep_size // torch.cuda.device_count())`` with a GPU, 1 without. Pass it
            to make layouts independent of the machine.
    """

    def __init__(
        self,
        redundant_to_original: torch.Tensor,
        n_routed_experts: int,
        n_logical_routed_experts: int,
        ep_size: int | None = None,
        group: dist.ProcessGroup | None = None,
        *,
        num_nodes: int | None = None,
    ) -> None:
        validate_r2o(redundant_to_original)
        group = process_group("group", group)
        group_size, n_sets = redundant_to_original.shape
        if ep_size is None:
            ep_size = group.size() if group is not None else group_size
        validate_r2o(redundant_to_original, ep_size)
        if group is not None and group.size() != ep_size:
            raise ValueError(f"ep_size {ep_size} differs from the group's size {group.size()}")
        n_routed = positive_int("n_routed_experts", n_routed_experts, maximum=1 << 20)
        n_logical = positive_int("n_logical_routed_experts", n_logical_routed_experts)
        if n_routed % ep_size or n_logical % ep_size:
            raise ValueError(
                f"n_routed_experts {n_routed} and n_logical_routed_experts {n_logical} must be "
                f"multiples of ep_size {ep_size}"
            )
        n_local_routed = n_routed // ep_size
        n_local_logical = n_logical // ep_size
        n_redundant = n_local_routed - n_local_logical
        if n_redundant <= 0 or n_redundant % n_sets or n_redundant > n_local_logical:
            raise ValueError(
                f"each rank needs a positive number of redundant slots, divisible by D = {n_sets} "
                f"and at most its {n_local_logical} original experts; got {n_redundant} "
                f"(n_routed_experts {n_routed}, n_logical_routed_experts {n_logical}, "
                f"ep_size {ep_size})"
            )
        if num_nodes is None:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            num_nodes = max(1, ep_size // gpus) if gpus else 1
        num_nodes = positive_int("num_nodes", num_nodes)
        n_group = ep_size // group_size
        if n_group % num_nodes == 0 and ep_size % num_nodes:
            raise ValueError(f"num_nodes={num_nodes} does not divide ep_size={ep_size}")

        self.group = group
        # Sums this rank's workload over the group before solving (lplb/comm.py): None without a
        # group, torch.distributed all-reduce by default, NVSHMEM after init_nvshmem().
        self._exchange: Callable[[torch.Tensor], torch.Tensor] | None = (
            comm.AllReduceExchange(group) if group is not None else None
        )
        self.ep_size = ep_size
        self.group_size = group_size
        self.n_sets = n_sets
        self.n_routed = n_routed
        self.n_logical = n_logical
        self.n_local_routed = n_local_routed
        self.n_local_logical = n_local_logical
        self.n_combined = n_redundant // n_sets
        self.n_group = n_group
        self.num_nodes = num_nodes
        self._layout_ints = list(ops.SolveLayout(n_local_logical, n_local_routed, self.n_combined))
        # Public maps live on r2o's device, int32 like DeepSeek LPLB's; the layout itself is
        # computed from these CPU copies.
        self.device = redundant_to_original.device
        self._r2o = redundant_to_original.detach().to("cpu", torch.int64)
        self._o2r = torch.empty_like(self._r2o)
        for d in range(n_sets):
            self._o2r[self._r2o[:, d], d] = torch.arange(group_size)
        self.r2o = self._r2o.to(self.device, torch.int32)
        self.o2r = self._o2r.to(self.device, torch.int32)
        self._maps: dict[torch.device, _DeviceMaps] = {}
        self._error_flags: dict[torch.device, torch.Tensor] = {}
        self._n_sms: dict[torch.device, int] = {}
        # Launch plans of the eager CUDA fast path of `run`, dropped when the layout changes.
        self._fast = FastPath(default_backend())
        self.update_redundancy_mapping()

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        """DeepSeek LPLB's name of the EP process group (``group``)."""
        return self.group

    def init_nvshmem(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum workloads with the device-side NVSHMEM exchange instead of an all-reduce.

        Starts NVSHMEM over ``group`` (default: the Planner's group) with the unique-id
        bootstrap, or reuses the runtime already started in this process over the same ranks,
        and allocates this Planner's symmetric buffers on the current CUDA device. Collective:
        every rank of the group calls it, for its Planners in the same order. Afterwards
        workloads must be int32 on that device (``count_workload``'s). docs/exchange.md.

        Args:
            group: process group of the ``ep_size`` EP ranks; becomes the Planner's group.

        Raises:
            ValueError: no group, or its size differs from ep_size.
            ImportError: lplb was built without NVSHMEM (install nvidia-nvshmem-cu13 and rebuild
                with LPLB_NVSHMEM=1).
            RuntimeError: NVSHMEM failed to start, or already runs over other ranks.
        """
        group = process_group("group", group)
        group = self._nvshmem_group(self.group if group is None else group)
        comm.init_nvshmem_runtime(group)
        self._exchange = comm.NvshmemExchange(group, self.n_logical)
        self.group = group

    def init_from_deep_ep(self, buffer: object) -> None:
        """Like ``init_nvshmem``, on the NVSHMEM runtime a ``deep_ep.Buffer`` started.

        DeepEP must start NVSHMEM with one PE per rank of its group (low-latency mode) and load
        the same shared ``libnvshmem_host.so.3`` as lplb; the group becomes the Planner's.

        Raises:
            ImportError: ``deep_ep`` (or lplb's NVSHMEM build) is missing.
            TypeError: ``buffer`` is not a ``deep_ep.Buffer``.
            ValueError: the buffer's group size differs from ep_size.
            RuntimeError: the buffer did not start NVSHMEM, or its PEs are not the group's ranks.
        """
        group = comm.attach_deep_ep(buffer)
        self._exchange = comm.NvshmemExchange(self._nvshmem_group(group), self.n_logical)
        self.group = group

    def _nvshmem_group(self, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        if group is None:
            raise ValueError(
                "the NVSHMEM exchange needs a process group: pass group= or build the Planner "
                "with one"
            )
        if group.size() != self.ep_size:
            raise ValueError(f"the group has {group.size()} ranks, but ep_size is {self.ep_size}")
        return group

    def update_redundancy_mapping(
        self, workload: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out the physical experts, optionally reordered by a load history.

        With a history, experts are spread over ranks as DeepSeek LPLB does (``rebalance_experts
        (history[None], E, n_group, num_nodes, ep_size)``, no replication), each rank's experts
        are sorted by history load (heaviest first, stable) and the first C * D become the
        replicated ones; without it, rank r holds experts r * n_local_logical onwards.
        Redundant slot n_local_logical + c * D + d of rank r copies original slot c * D + d of
        rank r2o[r, d] of the same group (lplb/layout.py).

        Args:
            workload: optional [E] load history (any int/float dtype, any device), finite and
                non-negative.

        Returns (on the device of the Planner's r2o, int32 like DeepSeek LPLB's; also kept as
        attributes):
            phy2log: [R] logical expert of each physical slot.
            log2phy: [E, 2] physical slots of each expert, original first, -1 padded.
            logcnt: [E] number of physical copies (1 or 2).
        """
        history = None
        if workload is not None:
            load_tensor("workload", tensor("workload", workload))
            if workload.shape != (self.n_logical,):
                raise ValueError(
                    f"workload must have shape [{self.n_logical}], got {tuple(workload.shape)}"
                )
            if workload.device.type == "meta":
                raise ValueError("workload must hold values (CPU or CUDA), got a meta tensor")
            history = workload.detach().to("cpu", torch.float64)
        experts = expert_order(history, self.n_logical, self.ep_size, self.n_group, self.num_nodes)
        layout = redundancy_layout(experts, self._r2o, self.n_combined, self.n_local_routed)
        self.phy2log, self.log2phy, self.logcnt, self.prob_index = (
            t.to(self.device, torch.int32)
            for t in (layout.phy2log, layout.log2phy, layout.logcnt, layout.prob_index)
        )
        self._maps = {}
        self._fast.clear()  # its plans point into the previous maps
        if torch.cuda.is_available():
            # Copy the maps to the current GPU now, so that the first `run` there neither
            # synchronises nor breaks a CUDA graph capture with a host-to-device copy.
            device = torch.device("cuda", torch.cuda.current_device())
            self._device_maps(device)
            self._error_flag(device)
        return self.phy2log, self.log2phy, self.logcnt

    # DeepSeek LPLB's names for the layout sizes, so that code written for it runs unchanged.
    @property
    def n_routed_experts(self) -> int:
        return self.n_routed

    @property
    def n_logical_routed_experts(self) -> int:
        return self.n_logical

    @property
    def n_local_routed_experts(self) -> int:
        return self.n_local_routed

    @property
    def n_local_logical_routed_experts(self) -> int:
        return self.n_local_logical

    @property
    def num_redundants(self) -> int:
        return self.n_sets

    @property
    def combined_redundant_experts(self) -> int:
        return self.n_combined

    def _device_maps(self, device: torch.device) -> _DeviceMaps:
        maps = self._maps.get(device)
        if maps is None:
            maps = _DeviceMaps(
                *(
                    t.to(device=device, dtype=torch.int32)
                    for t in (self.phy2log, self.r2o, self.o2r, self.log2phy, self.prob_index)
                )
            )
            self._maps[device] = maps
        return maps

    def _error_flag(self, device: torch.device) -> torch.Tensor:
        flag = self._error_flags.get(device)
        if flag is None:
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            self._error_flags[device] = flag
        return flag

    def _default_n_sms(self, device: torch.device) -> int:
        if device.type != "cuda":
            return CPU_N_SMS
        if device not in self._n_sms:
            self._n_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._n_sms[device]

    def check_errors(self) -> None:
        """Raise ValueError if a device kernel saw an index outside [-1, E) (synchronises)."""
        for device, flag in self._error_flags.items():
            if device.type != "meta" and int(flag.item()) != 0:
                flag.zero_()
                raise ValueError(
                    f"an expert index outside [-1, {self.n_logical}) was passed to the Planner "
                    f"on {device}"
                )

    def count_workload(self, idx: torch.Tensor, n_sms: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Count this call's tokens per logical expert.

        Args:
            idx: any shape, int32/int64 logical expert indices in [-1, E) (-1 = no expert).
            n_sms: chunks the flattened idx is cut into, in [1, lplb.ops.MAX_N_SMS].

        Returns:
            workload: [E] int32; workload_by_sm: [n_sms, E] int32, inclusive running totals of
            the per-chunk counts (row s counts chunks 0..s; the last row equals workload), as
            DeepSeek LPLB returns them.
        """
        int_tensor("idx", idx, dtypes=ops.INDEX_DTYPES)
        n_sms = positive_int("n_sms", n_sms, maximum=ops.MAX_N_SMS)
        return torch.ops.lplb.count_idx(idx, self._error_flag(idx.device), self.n_logical, n_sms)

    def solve_probs(
        self, workload: torch.Tensor, avail_counter: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the LP of every EP group for this batch's workload.

        Args:
            workload: [E] tokens per logical expert of this rank (int/float dtype); summed over
                `group` (on a copy) before solving when the Planner has one.
            avail_counter: one-element int32/int64 tensor on workload's device, incremented in
                place by the number of groups whose LP converged.

        Returns:
            probs: [n_group, group_size, D] float32, share of each replicated set kept on its
                original rank.
            global_workload: [n_group, group_size, n_local_logical] float32, the (summed)
                workload that was solved for, viewed by rank as DeepSeek LPLB returns it.
        """
        tensor("workload", workload)
        int_tensor("avail_counter", avail_counter, dtypes=ops.INDEX_DTYPES)
        if workload.shape != (self.n_logical,):
            raise ValueError(
                f"workload must have shape [{self.n_logical}], got {tuple(workload.shape)}"
            )
        probs, workload = self._solve(workload, avail_counter)
        shape = (self.n_group, self.group_size, self.n_local_logical)
        return probs, workload.to(torch.float32).view(shape)

    def _solve(
        self, workload: torch.Tensor, avail_counter: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exchange (when the Planner has a group) and solve: probs and the summed [E] workload.

        ``run`` calls this rather than ``solve_probs``: it needs no float32 copy of the workload,
        which would be one more kernel in every captured graph.
        """
        if self._exchange is not None:
            workload = self._exchange(workload)
        maps = self._device_maps(workload.device)
        probs = torch.ops.lplb.solve(
            workload, maps.phy2log, maps.r2o, maps.o2r, avail_counter, self._layout_ints
        )
        return probs, workload

    def weighted_select_target(
        self,
        idx: torch.Tensor,
        probs: torch.Tensor,
        workload_by_sm: torch.Tensor,
        n_sms: int,
    ) -> torch.Tensor:
        """Map logical indices to physical slots, splitting replicated experts by `probs`.

        Args:
            idx: any shape, int32/int64, the idx that `count_workload` counted.
            probs: [n_group, group_size, D] float32 from `solve_probs`.
            workload_by_sm: [n_sms, E] int32 from `count_workload(idx, n_sms)`.
            n_sms: the chunk count used for counting.

        Returns:
            Physical expert of every entry in [0, R), same shape and dtype as idx; -1 kept.
            Entries outside [-1, E) raise ValueError on the CPU; on a GPU they map to -1 and
            set the error flag that `check_errors` reads.
        """
        int_tensor("idx", idx, dtypes=ops.INDEX_DTYPES)
        tensor("probs", probs)
        tensor("workload_by_sm", workload_by_sm)
        n_sms = positive_int("n_sms", n_sms, maximum=ops.MAX_N_SMS)
        expected = (self.n_group, self.group_size, self.n_sets)
        if probs.shape != expected:
            raise ValueError(f"probs must have shape {list(expected)}, got {tuple(probs.shape)}")
        if workload_by_sm.shape != (n_sms, self.n_logical):
            raise ValueError(
                f"workload_by_sm must have shape [{n_sms}, {self.n_logical}], "
                f"got {tuple(workload_by_sm.shape)}"
            )
        maps = self._device_maps(idx.device)
        return torch.ops.lplb.map_idx(
            idx, probs, workload_by_sm, maps.log2phy, maps.prob_index, self._error_flag(idx.device)
        )

    def run(
        self, idx: torch.Tensor, avail_counter: torch.Tensor, n_sms: int | None = None
    ) -> torch.Tensor:
        """Balance one batch: count -> (sum over the EP group) -> solve -> map.

        On CUDA, outside tracing and CUDA-graph capture, the first call per (device, idx
        dtype, n_sms, stream, thread) runs the custom ops (which validate the arguments) and
        later calls launch the same kernels through one cached native call (lplb/fast_path.py):
        the result is identical, the host time a fraction. torch.compile, CUDA-graph capture,
        fake tensors and the CPU take the custom ops every time.

        Args:
            idx: any shape, int32/int64 logical expert indices in [-1, E).
            avail_counter: one-element int32/int64 tensor, += groups whose LP converged.
            n_sms: counting chunks; defaults to the GPU's multiprocessor count on CUDA and 8
                on CPU (the result does not depend on it).

        Returns:
            Physical expert indices, same shape and dtype as idx.
        """
        if torch.compiler.is_compiling():
            return self._run_ops(idx, avail_counter, n_sms)
        return self._fast.run(self, idx, avail_counter, n_sms)

    def _run_ops(
        self, idx: torch.Tensor, avail_counter: torch.Tensor, n_sms: int | None
    ) -> torch.Tensor:
        """``run`` through the three custom ops (traceable; validates every argument)."""
        int_tensor("idx", idx, dtypes=ops.INDEX_DTYPES)
        if n_sms is None:
            n_sms = self._default_n_sms(idx.device)
        workload, workload_by_sm = self.count_workload(idx, n_sms)
        int_tensor("avail_counter", avail_counter, dtypes=ops.INDEX_DTYPES)
        probs, _ = self._solve(workload, avail_counter)
        return self.weighted_select_target(idx, probs, workload_by_sm, n_sms)
