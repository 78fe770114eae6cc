"""CUDA kernels of the LPLB custom ops (lplb/ops.py), registered for the "cuda" device.

Each function validates shapes and dtypes on the host (sizes only: nothing reads device memory,
so there is no host synchronisation), allocates outputs with torch on the input's device and
launches the kernel of `lplb._C` on the current stream. That keeps `Planner.run` capturable in a
CUDA graph and traceable by torch.compile. Kernel design and error semantics: docs/kernels.md.
"""

import torch

from lplb import _C, ops  # noqa: F401  (ops defines the torch.ops.lplb schemas registered here)

__all__ = ["MAX_GROUP_SIZE", "MAX_LOGICAL", "MAX_SETS"]

# Largest sizes the kernels take: one warp per group (one lane per rank), the unrolled set loop,
# and the per-warp expert counters of map_idx in 48 KiB of shared memory.
MAX_GROUP_SIZE = 32
MAX_SETS = 4
MAX_LOGICAL = 2048

_INDEX_DTYPES = (torch.int32, torch.int64)
_WORKLOAD_TYPES = {
    torch.int32: _C.workload_types["int32"],
    torch.int64: _C.workload_types["int64"],
    torch.float32: _C.workload_types["float32"],
    torch.float64: _C.workload_types["float64"],
}


def _check_tensor(name: str, t: torch.Tensor, device: torch.device, dtypes: tuple) -> None:
    """Raise TypeError/ValueError unless `t` is a tensor of one of `dtypes` on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_n_logical(n_logical: int) -> None:
    if not 1 <= n_logical <= MAX_LOGICAL:
        raise ValueError(f"n_logical must be in [1, {MAX_LOGICAL}], got {n_logical}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@torch.library.register_kernel("lplb::count_idx", "cuda")
def count_idx(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA count_idx: see lplb.ops.count_idx.

    Args:
        idx: any shape, int32/int64 on a CUDA device.
        error_flag: [1] int32, set to 1 (never cleared) when an entry is outside [-1, n_logical).
        n_logical: E, in [1, MAX_LOGICAL]; n_sms: chunks, >= 1.

    Returns:
        workload: [E] int32; workload_by_sm: [n_sms, E] int32 exclusive prefix over chunks.
    """
    device = idx.device
    _check_tensor("idx", idx, device, _INDEX_DTYPES)
    _check_tensor("error_flag", error_flag, device, (torch.int32,))
    if error_flag.numel() != 1:
        raise ValueError(f"error_flag must have one element, got shape {tuple(error_flag.shape)}")
    _check_n_logical(n_logical)
    if n_sms < 1:
        raise ValueError(f"n_sms must be >= 1, got {n_sms}")
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
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
) -> torch.Tensor:
    """CUDA solve: one 32-thread block per group, see lplb.ops.solve and docs/lp.md.

    Args:
        workload: [E] int32/int64/float32/float64; phy2log: [R] int32;
        r2o, o2r: [G, D] int32 with 2 <= G <= MAX_GROUP_SIZE, 1 <= D <= MAX_SETS;
        avail_counter: one int32/int64 element, += converged groups (atomically, on device).
        n_local_logical, n_local_routed, n_combined: per-rank layout (docs/lp.md).

    Returns:
        probs: [R / (G * n_local_routed), G, D] float32.
    """
    device = workload.device
    _check_tensor("workload", workload, device, tuple(_WORKLOAD_TYPES))
    for name, t in (("phy2log", phy2log), ("r2o", r2o), ("o2r", o2r)):
        _check_tensor(name, t, device, (torch.int32,))
    _check_tensor("avail_counter", avail_counter, device, _INDEX_DTYPES)
    if workload.dim() != 1:
        raise ValueError(f"workload must be 1-D [E], got shape {tuple(workload.shape)}")
    if workload.numel() < 1:
        raise ValueError("workload must have at least one expert, got 0")
    if avail_counter.numel() != 1:
        raise ValueError(
            f"avail_counter must have one element, got shape {tuple(avail_counter.shape)}"
        )
    if r2o.dim() != 2 or r2o.shape != o2r.shape:
        raise ValueError(
            f"r2o and o2r must both be [G, D], got {tuple(r2o.shape)} and {tuple(o2r.shape)}"
        )
    group_size, n_sets = r2o.shape
    if not 2 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group size must be in [2, {MAX_GROUP_SIZE}], got {group_size}")
    if not 1 <= n_sets <= MAX_SETS:
        raise ValueError(f"redundant sets per rank D must be in [1, {MAX_SETS}], got {n_sets}")
    if n_combined < 0 or not n_combined * n_sets <= n_local_logical <= n_local_routed:
        raise ValueError(
            "need 0 <= n_combined * D <= n_local_logical <= n_local_routed, got "
            f"n_combined={n_combined}, D={n_sets}, n_local_logical={n_local_logical}, "
            f"n_local_routed={n_local_routed}"
        )
    group_slots = group_size * n_local_routed
    if phy2log.dim() != 1 or phy2log.numel() % group_slots != 0:
        raise ValueError(
            f"phy2log must be 1-D with a multiple of G * n_local_routed = {group_slots} slots, "
            f"got shape {tuple(phy2log.shape)}"
        )
    n_group = phy2log.numel() // group_slots
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
        n_local_logical,
        n_local_routed,
        n_combined,
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
) -> torch.Tensor:
    """CUDA map_idx: deterministic, identical to lplb.reference.map_idx for the same probs.

    Args:
        idx: any shape, int32/int64; probs: float32 (any shape, indexed flat);
        workload_by_sm: [n_sms, E] int32 from count_idx on the same idx and n_sms;
        log2phy: [E, 2] int32; prob_index: [E] int32 (-1: not replicated).

    Returns:
        Physical slots, same shape and dtype as idx; -1 and out-of-range entries give -1.
    """
    device = idx.device
    _check_tensor("idx", idx, device, _INDEX_DTYPES)
    _check_tensor("probs", probs, device, (torch.float32,))
    for name, t in (
        ("workload_by_sm", workload_by_sm),
        ("log2phy", log2phy),
        ("prob_index", prob_index),
    ):
        _check_tensor(name, t, device, (torch.int32,))
    if workload_by_sm.dim() != 2 or workload_by_sm.shape[0] < 1:
        raise ValueError(
            f"workload_by_sm must be [n_sms >= 1, E], got shape {tuple(workload_by_sm.shape)}"
        )
    n_sms, n_logical = workload_by_sm.shape
    _check_n_logical(n_logical)
    if log2phy.shape != (n_logical, 2) or prob_index.shape != (n_logical,):
        raise ValueError(
            f"log2phy must be [{n_logical}, 2] and prob_index [{n_logical}], got "
            f"{tuple(log2phy.shape)} and {tuple(prob_index.shape)}"
        )
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
        _stream(device),
    )
    return out.view(idx.shape)
