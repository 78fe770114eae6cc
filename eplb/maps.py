"""Placement maps: conversions between ``phy2log`` and ``log2phy``.

Conventions: ``phy2log`` is ``[L, R]`` (or ``[R]`` for one layer) int64, the logical expert held
by each physical slot, ``-1`` for an unused slot. ``log2phy`` is ``[L, E, max_copies]`` int64,
the slots of each logical expert, ``-1`` padded; ``logcnt`` is ``[L, E]`` int64, copies per expert.
"""

from __future__ import annotations

import torch

from eplb import _C
from eplb.checks import MAX_SLOTS, int_tensor, positive_int, readable

__all__ = ["as_layers", "expert_counts", "log2phy_from_ranks", "phy2log_to_log2phy"]


def as_layers(phy2log: torch.Tensor, name: str = "phy2log") -> torch.Tensor:
    """``phy2log`` ([R] or [L, R], non-empty, integer tensor or array) as a CPU int64 ``[L, R]``
    tensor with ids >= -1; ``name`` is the argument named in errors."""
    p = readable(name, int_tensor(name, phy2log, convert=True))
    if p.dim() not in (1, 2) or p.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [R] or [L, R], got shape {tuple(p.shape)}")
    p = p.to("cpu", torch.int64).reshape(-1, p.shape[-1])
    if int(p.min()) < -1:
        raise ValueError(f"{name} holds {int(p.min())}; logical ids are >= 0, or -1 for unused")
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
        phy2log: [L, R] integer, logical id per slot (-1 for unused slots).
        phyrank: [L, R] integer, which copy of its expert each slot holds: the slots of an
            expert with ``c`` copies hold ranks ``0 .. c-1``, each once (ignored on unused slots).
        logcnt: [L, E] integer, copies per logical expert: how often ``phy2log`` holds it.

    Returns:
        log2phy: [L, E, max(logcnt)] int64, ``log2phy[l, e, r]`` = the slot holding copy ``r`` of
        expert ``e``, -1 past ``logcnt[l, e]``.

    Raises:
        TypeError: an argument is not an integer tensor or array.
        ValueError: shapes that do not match, ids outside [-1, E), counts other than those of
            ``phy2log``, or ranks that are not ``0 .. logcnt - 1`` for every expert.
    """
    p2l = as_layers(phy2log)
    rank = readable("phyrank", int_tensor("phyrank", phyrank, convert=True))
    cnt = readable("logcnt", int_tensor("logcnt", logcnt, convert=True))
    if rank.shape != p2l.shape or cnt.dim() != 2 or cnt.shape[0] != p2l.shape[0]:
        raise ValueError(
            f"phy2log {tuple(p2l.shape)}, phyrank {tuple(rank.shape)} and logcnt "
            f"{tuple(cnt.shape)} must be [L, R], [L, R] and [L, E]"
        )
    num_logical = positive_int("logcnt.shape[1]", cnt.shape[1], maximum=MAX_SLOTS)
    if int(p2l.max()) >= num_logical:
        raise ValueError(f"phy2log holds expert {int(p2l.max())} but logcnt has {num_logical}")
    cnt = cnt.to("cpu", torch.int64)
    if not torch.equal(cnt, expert_counts(p2l, num_logical)):
        raise ValueError("logcnt must count the slots of each expert in phy2log")
    rank = rank.to("cpu", torch.int64).reshape(p2l.shape)
    # Ranks below each expert's count that are unique per expert (checked in C++) are exactly
    # 0 .. count - 1.
    copies = cnt.gather(1, p2l.clamp(min=0))
    bad = (p2l >= 0) & ((rank < 0) | (rank >= copies))
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"phyrank[{layer}, {slot}] = {int(rank[layer, slot])} for a copy of expert "
            f"{int(p2l[layer, slot])}, which has {int(copies[layer, slot])} copies: ranks must "
            f"lie in [0, {int(copies[layer, slot])})"
        )
    return _log2phy(p2l, rank, cnt)


def _log2phy(p2l: torch.Tensor, rank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``log2phy_from_ranks`` for checked CPU int64 inputs: [L, R], [L, R], [L, E]."""
    num_layers, num_logical = logcnt.shape
    maxcnt = int(logcnt.max())
    p2l, rank = p2l.contiguous(), rank.contiguous()
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
            f"phy2log ids must be below {num_logical}, and phyrank must lie in [0, {maxcnt}) "
            "and be unique per expert on used slots"
        )
    return log2phy


def phy2log_to_log2phy(
    phy2log: torch.Tensor, num_logical: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a placement; copies of an expert are ranked in slot order.

    Args:
        phy2log: [L, R] or [R] integer tensor, logical id per slot, -1 for unused slots.
        num_logical: number of logical experts E (at most 2**20); default ``max(phy2log) + 1``
            (then phy2log must hold some expert).

    Returns:
        log2phy: [L, E, maxcnt] (or [E, maxcnt]) int64, slots of each expert, -1 padded.
        logcnt: [L, E] (or [E]) int64, copies of each expert.
    """
    p = as_layers(phy2log)
    top = int(p.max()) + 1
    if num_logical is None:
        if top == 0:
            raise ValueError("phy2log holds no expert (all -1): pass num_logical")
        num_logical = top
    num_logical = positive_int("num_logical", num_logical, maximum=MAX_SLOTS)
    if num_logical < top:
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
    log2phy = _log2phy(p, phyrank, logcnt)
    if torch.as_tensor(phy2log).dim() == 1:
        return log2phy[0], logcnt[0]
    return log2phy, logcnt
