"""CUDA kernels of the LPLB custom ops (lplb/ops.py), registered for the "cuda" device.

Each function runs the op's argument check (lplb/ops.py, shared with the CPU kernels), the
limits of the CUDA kernels, allocates outputs with torch on the input's device and launches the
kernel of ``lplb._C`` on the current stream. Nothing reads device memory, so there is no host
synchronisation: ``Planner.run`` stays capturable in a CUDA graph and traceable by torch.compile.
Kernel design and error semantics: docs/kernels.md.
"""

from __future__ import annotations

import torch

from lplb import _C, ops

__all__ = ["MAX_GROUP_SIZE", "MAX_LOGICAL", "MAX_SETS"]

# Largest sizes the kernels take: one warp per group (one lane per rank), the unrolled set loop,
# and the per-warp expert counters of map_idx in 48 KiB of shared memory.
MAX_GROUP_SIZE = 32
MAX_SETS = 4
MAX_LOGICAL = 2048

_WORKLOAD_TYPES = {
    torch.int32: _C.workload_types["int32"],
    torch.int64: _C.workload_types["int64"],
    torch.float32: _C.workload_types["float32"],
    torch.float64: _C.workload_types["float64"],
}


def _check_n_logical(n_logical: int) -> None:
    if not 1 <= n_logical <= MAX_LOGICAL:
        raise ValueError(f"the CUDA kernels take n_logical in [1, {MAX_LOGICAL}], got {n_logical}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@torch.library.register_kernel("lplb::count_idx", "cuda")
def count_idx(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA count_idx: see lplb.ops.count_idx (running totals over chunks; error flag set, never
    cleared, on an entry outside [-1, n_logical))."""
    ops.check_count_args(idx, error_flag, n_logical, n_sms)
    _check_n_logical(n_logical)
    device = idx.device
    flat = idx.reshape(-1).contiguous()
    workload = torch.empty(n_logical, dtype=torch.int32, device=device)
    workload_by_sm = torch.empty((n_sms, n_logical), dtype=torch.int32, device=device)
    _C.count_idx_cuda(
        device.index,
        flat.data_ptr(),
        flat.dtype == torch.int64,
        flat.numel(),
        n_logical,
        n_sms,
        workload.data_ptr(),
        workload_by_sm.data_ptr(),
        error_flag.data_ptr(),
        _stream(device),
    )
    return workload, workload_by_sm


@torch.library.register_kernel("lplb::solve", "cuda")
def solve(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    layout: list[int],
) -> torch.Tensor:
    """CUDA solve: one 32-thread block per group, see lplb.ops.solve and docs/lp.md.

    Kernel limits: 2 <= G <= MAX_GROUP_SIZE, 1 <= D <= MAX_SETS; phy2log, r2o, o2r int32.
    """
    lay = ops.check_solve_args(workload, phy2log, r2o, o2r, avail_counter, layout)
    for name, t in (("phy2log", phy2log), ("r2o", r2o), ("o2r", o2r)):
        if t.dtype != torch.int32:
            raise TypeError(f"the CUDA solve takes int32 {name}, got {t.dtype}")
    group_size, n_sets = r2o.shape
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"group size must be in [2, {MAX_GROUP_SIZE}], got {group_size}")
    if n_sets > MAX_SETS:
        raise ValueError(f"redundant sets per rank D must be in [1, {MAX_SETS}], got {n_sets}")
    device = workload.device
    n_group = phy2log.numel() // (group_size * lay.n_local_routed)
    workload = workload.contiguous()
    phy2log, r2o, o2r = phy2log.contiguous(), r2o.contiguous(), o2r.contiguous()
    probs = torch.empty((n_group, group_size, n_sets), dtype=torch.float32, device=device)
    _C.solve_cuda(
        device.index,
        workload.data_ptr(),
        _WORKLOAD_TYPES[workload.dtype],
        workload.numel(),
        phy2log.data_ptr(),
        phy2log.numel(),
        r2o.data_ptr(),
        o2r.data_ptr(),
        avail_counter.data_ptr(),
        avail_counter.dtype == torch.int64,
        group_size,
        n_sets,
        n_group,
        *lay,
        probs.data_ptr(),
        _stream(device),
    )
    return probs


@torch.library.register_kernel("lplb::map_idx", "cuda")
def map_idx(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
    error_flag: torch.Tensor,
) -> torch.Tensor:
    """CUDA map_idx: deterministic, identical to lplb.reference.map_idx for the same probs;
    entries outside [-1, E) map to -1 and set error_flag."""
    ops.check_map_args(idx, probs, workload_by_sm, log2phy, prob_index, error_flag)
    n_sms, n_logical = workload_by_sm.shape
    _check_n_logical(n_logical)
    device = idx.device
    flat = idx.reshape(-1).contiguous()
    probs, workload_by_sm = probs.contiguous(), workload_by_sm.contiguous()
    log2phy, prob_index = log2phy.contiguous(), prob_index.contiguous()
    out = torch.empty_like(flat)
    _C.map_idx_cuda(
        device.index,
        flat.data_ptr(),
        flat.dtype == torch.int64,
        flat.numel(),
        out.data_ptr(),
        probs.data_ptr(),
        probs.numel(),
        workload_by_sm.data_ptr(),
        n_sms,
        n_logical,
        log2phy.data_ptr(),
        prob_index.data_ptr(),
        error_flag.data_ptr(),
        _stream(device),
    )
    return out.view(idx.shape)
