"""Placement maps: conversions between ``phy2log`` and ``log2phy``.

Conventions: ``phy2log`` is ``[L, R]`` (or ``[R]`` for one layer) int64, the logical expert held
by each physical slot, ``-1`` for an unused slot. ``log2phy`` is ``[L, E, max_copies]`` int64,
the slots of each logical expert, ``-1`` padded; ``logcnt`` is ``[L, E]`` int64, copies per expert.
"""

from __future__ import annotations

import torch

from eplb import _C

__all__ = ["as_layers", "expert_counts", "log2phy_from_ranks", "phy2log_to_log2phy"]


def as_layers(phy2log: torch.Tensor) -> torch.Tensor:
    """``phy2log`` ([R] or [L, R], any integer dtype) as a CPU int64 ``[L, R]`` tensor."""
    p = torch.as_tensor(phy2log)
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"phy2log must have an integer dtype, got {p.dtype}")
    if p.dim() not in (1, 2):
        raise ValueError(f"phy2log must be [R] or [L, R], got shape {tuple(p.shape)}")
    p = p.to("cpu", torch.int64).reshape(-1, p.shape[-1])
    if p.numel() and int(p.min()) < -1:
        raise ValueError(f"phy2log holds {int(p.min())}; logical ids are >= 0, or -1 for unused")
    return p


def expert_counts(p: torch.Tensor, num_logical: int) -> torch.Tensor:
    """Copies of each logical expert: ``p`` [L, R] int64 (-1 ignored) -> [L, num_logical] int64."""
    valid = p >= 0
    logcnt = torch.zeros(p.shape[0], num_logical, dtype=torch.int64)
    return logcnt.scatter_add_(1, p.clamp(min=0), valid.to(torch.int64))


def log2phy_from_ranks(
    phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor
) -> torch.Tensor:
    """Inverse map from the replica rank of every slot.

    Args:
        phy2log: [L, R] int64, logical id per slot (-1 for unused slots).
        phyrank: [L, R] int64, which copy of its expert each slot holds (0, 1, ...).
        logcnt: [L, E] int64, copies per logical expert.

    Returns:
        log2phy: [L, E, max(logcnt)] int64, ``log2phy[l, e, r]`` = the slot holding copy ``r`` of
        expert ``e``, -1 past ``logcnt[l, e]``.
    """
    num_layers, num_logical = logcnt.shape
    maxcnt = int(logcnt.max()) if logcnt.numel() else 0
    p2l = phy2log.to("cpu", torch.int64).contiguous()
    rank = phyrank.to("cpu", torch.int64).contiguous()
    if p2l.shape != rank.shape or p2l.shape[0] != num_layers:
        raise ValueError(
            f"phy2log {tuple(p2l.shape)}, phyrank {tuple(rank.shape)} and logcnt "
            f"{tuple(logcnt.shape)} do not match"
        )
    log2phy = torch.empty(num_layers, num_logical, maxcnt, dtype=torch.int64)
    # A C++ loop: torch's fill/scatter would wake its thread pool, costing milliseconds on a
    # busy machine for a few hundred writes.
    if not _C.eplb_log2phy(
        p2l.data_ptr(),
        rank.data_ptr(),
        num_layers,
        p2l.shape[1],
        num_logical,
        maxcnt,
        log2phy.data_ptr(),
    ):
        raise ValueError(
            f"phy2log ids must be below {num_logical} and phyrank must lie in [0, {maxcnt}) "
            "on used slots"
        )
    return log2phy


def phy2log_to_log2phy(
    phy2log: torch.Tensor, num_logical: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a placement; copies of an expert are ranked in slot order.

    Args:
        phy2log: [L, R] or [R] integer tensor, logical id per slot, -1 for unused slots.
        num_logical: number of logical experts E; default ``max(phy2log) + 1``.

    Returns:
        log2phy: [L, E, maxcnt] (or [E, maxcnt]) int64, slots of each expert, -1 padded.
        logcnt: [L, E] (or [E]) int64, copies of each expert.
    """
    p = as_layers(phy2log)
    top = int(p.max()) + 1 if p.numel() else 0
    if num_logical is None:
        num_logical = top
    elif num_logical < top:
        raise ValueError(f"phy2log holds expert {top - 1} but num_logical={num_logical}")
    logcnt = expert_counts(p, num_logical)
    # Rank of a slot = earlier slots with the same expert: position in a stable sort minus the
    # position where that expert's run starts.
    values, order = torch.sort(p, dim=1, stable=True)
    position = torch.arange(p.shape[1], dtype=torch.int64).expand_as(p)
    run_start = torch.ones_like(values, dtype=torch.bool)
    run_start[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.where(run_start, position, 0).cummax(dim=1).values
    phyrank = torch.empty_like(p).scatter_(1, order, position - first)
    log2phy = log2phy_from_ranks(p, phyrank, logcnt)
    if torch.as_tensor(phy2log).dim() == 1:
        return log2phy[0], logcnt[0]
    return log2phy, logcnt
