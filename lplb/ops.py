"""torch.library custom ops of LPLB: the schemas, their argument checks, CPU kernels and fake
(meta) implementations.

The schemas are the contract between the Python API and the backends. Each op's arguments are
validated here, once (``check_*``), and every backend calls that check: the CPU kernels
(lplb/reference.py) registered below and the CUDA kernels of lplb/cuda_ops.py. The fake
implementations let ``Planner.run`` be traced by ``torch.compile(fullgraph=True)`` and captured in
CUDA graphs.

Index rule, the same everywhere: entries of ``idx`` outside ``[-1, E)`` raise ``ValueError`` on
the CPU and set ``error_flag`` on a GPU (read by ``Planner.check_errors``), never a silent drop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eplb.checks import int_tensor, tensor
from lplb import reference

__all__ = ["MAX_N_SMS", "SolveLayout", "count_idx", "map_idx", "solve"]

# Chunks of idx counted separately. A GPU has at most a few hundred multiprocessors; the bound
# keeps a mistaken n_sms from allocating [n_sms, E] counters of gigabytes.
MAX_N_SMS = 4096

INDEX_DTYPES = (torch.int32, torch.int64)
WORKLOAD_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


class SolveLayout(NamedTuple):
    """Per-rank layout integers of the solve op, passed as one ``int[]`` argument so that the
    op's signature is spelled once; adding a field touches only this class.

    Attributes:
        n_local_logical: original slots per rank.
        n_local_routed: all slots per rank (originals + copies).
        n_combined: C, experts per replicated set.
    """

    n_local_logical: int
    n_local_routed: int
    n_combined: int


def _same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    """Every tensor on ``device``; real (non-fake) meta tensors only while tracing."""
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the op's other inputs are on {device}")
    if device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(
            "lplb ops cannot run on meta tensors outside tracing (they would return "
            "uninitialised memory); pass CPU or CUDA tensors"
        )


def check_count_args(idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int):
    """Validate count_idx's arguments; ValueError/TypeError naming the bad one."""
    int_tensor("idx", idx, dtypes=INDEX_DTYPES)
    int_tensor("error_flag", error_flag, dtypes=(torch.int32,))
    _same_device(idx.device, error_flag=error_flag)
    if error_flag.numel() != 1:
        raise ValueError(f"error_flag must have one element, got shape {tuple(error_flag.shape)}")
    if n_logical < 1:
        raise ValueError(f"n_logical must be >= 1, got {n_logical}")
    if not 1 <= n_sms <= MAX_N_SMS:
        raise ValueError(f"n_sms must be in [1, {MAX_N_SMS}], got {n_sms}")


def check_solve_args(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    layout: list[int],
) -> SolveLayout:
    """Validate solve's arguments; returns the unpacked layout."""
    tensor("workload", workload)
    if workload.dtype not in WORKLOAD_DTYPES:
        raise TypeError(f"workload must be int32/int64/float32/float64, got {workload.dtype}")
    for name, t in (("phy2log", phy2log), ("r2o", r2o), ("o2r", o2r)):
        int_tensor(name, t, dtypes=INDEX_DTYPES)
    int_tensor("avail_counter", avail_counter, dtypes=INDEX_DTYPES)
    _same_device(workload.device, phy2log=phy2log, r2o=r2o, o2r=o2r, avail_counter=avail_counter)
    if len(layout) != len(SolveLayout._fields):
        raise ValueError(f"layout must be {list(SolveLayout._fields)}, got {list(layout)}")
    lay = SolveLayout(*layout)
    if workload.dim() != 1 or workload.numel() < 1:
        raise ValueError(f"workload must be 1-D [E] with E >= 1, got shape {tuple(workload.shape)}")
    if avail_counter.numel() != 1:
        raise ValueError(
            f"avail_counter must have one element, got shape {tuple(avail_counter.shape)}"
        )
    if r2o.dim() != 2 or r2o.shape != o2r.shape or r2o.shape[0] < 2 or r2o.shape[1] < 1:
        raise ValueError(
            f"r2o and o2r must both be [G >= 2, D >= 1], got {tuple(r2o.shape)} and "
            f"{tuple(o2r.shape)}"
        )
    group_size, n_sets = r2o.shape
    if lay.n_combined < 0 or not (
        lay.n_combined * n_sets <= lay.n_local_logical <= lay.n_local_routed
    ):
        raise ValueError(
            f"need 0 <= n_combined * D <= n_local_logical <= n_local_routed, got {lay} with "
            f"D={n_sets}"
        )
    group_slots = group_size * lay.n_local_routed
    if phy2log.dim() != 1 or group_slots < 1 or phy2log.numel() % group_slots:
        raise ValueError(
            f"phy2log must be 1-D with a multiple of G * n_local_routed = {group_slots} slots, "
            f"got shape {tuple(phy2log.shape)}"
        )
    return lay


def check_map_args(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
    error_flag: torch.Tensor,
) -> None:
    """Validate map_idx's arguments; ValueError/TypeError naming the bad one."""
    int_tensor("idx", idx, dtypes=INDEX_DTYPES)
    tensor("probs", probs)
    if probs.dtype != torch.float32:
        raise TypeError(f"probs must be float32, got {probs.dtype}")
    for name, t in (
        ("workload_by_sm", workload_by_sm),
        ("log2phy", log2phy),
        ("prob_index", prob_index),
        ("error_flag", error_flag),
    ):
        int_tensor(name, t, dtypes=(torch.int32,))
    _same_device(
        idx.device,
        probs=probs,
        workload_by_sm=workload_by_sm,
        log2phy=log2phy,
        prob_index=prob_index,
        error_flag=error_flag,
    )
    if workload_by_sm.dim() != 2 or not 1 <= workload_by_sm.shape[0] <= MAX_N_SMS:
        raise ValueError(
            f"workload_by_sm must be [n_sms in [1, {MAX_N_SMS}], E], got shape "
            f"{tuple(workload_by_sm.shape)}"
        )
    n_logical = workload_by_sm.shape[1]
    if log2phy.shape != (n_logical, 2) or prob_index.shape != (n_logical,):
        raise ValueError(
            f"log2phy must be [{n_logical}, 2] and prob_index [{n_logical}], got "
            f"{tuple(log2phy.shape)} and {tuple(prob_index.shape)}"
        )
    if error_flag.numel() != 1:
        raise ValueError(f"error_flag must have one element, got shape {tuple(error_flag.shape)}")


@torch.library.custom_op(
    "lplb::count_idx",
    mutates_args=("error_flag",),
    device_types="cpu",
    schema="(Tensor idx, Tensor(a!) error_flag, int n_logical, int n_sms) -> (Tensor, Tensor)",
)
def count_idx(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per logical expert, overall and as inclusive running totals over ``n_sms`` chunks.

    Args:
        idx: any shape, int32/int64, values in [-1, n_logical).
        error_flag: [1] int32; device kernels set it to 1 on an out-of-range index (the CPU
            kernel raises ValueError instead).
        n_logical: number of logical experts E.
        n_sms: number of chunks of the flattened idx, in [1, MAX_N_SMS].

    Returns:
        workload: [E] int32; workload_by_sm: [n_sms, E] int32, row s = tokens per expert in
        chunks 0..s (the last row equals workload).
    """
    check_count_args(idx, error_flag, n_logical, n_sms)
    return reference.count_idx(idx, n_logical, n_sms)


@count_idx.register_fake
def _(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_count_args(idx, error_flag, n_logical, n_sms)
    return (
        idx.new_empty((n_logical,), dtype=torch.int32),
        idx.new_empty((n_sms, n_logical), dtype=torch.int32),
    )


@torch.library.custom_op(
    "lplb::solve",
    mutates_args=("avail_counter",),
    device_types="cpu",
    schema=(
        "(Tensor workload, Tensor phy2log, Tensor r2o, Tensor o2r, Tensor(a!) avail_counter, "
        "int[] layout) -> Tensor"
    ),
)
def solve(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    layout: list[int],
) -> torch.Tensor:
    """Solve the per-group LP (docs/lp.md) and return the shares kept on original ranks.

    Args:
        workload: [E] any int/float dtype, tokens per logical expert (already all-reduced).
        phy2log: [R] int32/int64, logical expert of each physical slot.
        r2o, o2r: [G, D] int32/int64, topology and its column-wise inverse.
        avail_counter: one-element int32/int64, += number of groups that converged.
        layout: the per-rank layout, ``list(SolveLayout(...))``.

    Returns:
        probs: [n_group, G, D] float32 with n_group = R / (G * n_local_routed).
    """
    lay = check_solve_args(workload, phy2log, r2o, o2r, avail_counter, layout)
    return reference.solve(workload, phy2log, r2o, o2r, avail_counter, *lay)


@solve.register_fake
def _(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    layout: list[int],
) -> torch.Tensor:
    lay = check_solve_args(workload, phy2log, r2o, o2r, avail_counter, layout)
    group_size, n_sets = r2o.shape
    n_group = phy2log.shape[0] // (group_size * lay.n_local_routed)
    return workload.new_empty((n_group, group_size, n_sets), dtype=torch.float32)


@torch.library.custom_op(
    "lplb::map_idx",
    mutates_args=("error_flag",),
    device_types="cpu",
    schema=(
        "(Tensor idx, Tensor probs, Tensor workload_by_sm, Tensor log2phy, Tensor prob_index, "
        "Tensor(a!) error_flag) -> Tensor"
    ),
)
def map_idx(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
    error_flag: torch.Tensor,
) -> torch.Tensor:
    """Map logical indices to physical slots (docs/lp.md, "Token mapping").

    Args:
        idx: any shape, int32/int64, values in [-1, E).
        probs: [n_group, G, D] float32 (indexed flat).
        workload_by_sm: [n_sms, E] int32 inclusive running totals from count_idx on idx.
        log2phy: [E, 2] int32; prob_index: [E] int32.
        error_flag: [1] int32, set to 1 by device kernels on an index outside [-1, E) (the CPU
            kernel raises ValueError instead).

    Returns:
        Same shape and dtype as idx.
    """
    check_map_args(idx, probs, workload_by_sm, log2phy, prob_index, error_flag)
    return reference.map_idx(idx, probs, workload_by_sm, log2phy, prob_index)


@map_idx.register_fake
def _(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
    error_flag: torch.Tensor,
) -> torch.Tensor:
    check_map_args(idx, probs, workload_by_sm, log2phy, prob_index, error_flag)
    return torch.empty_like(idx)
