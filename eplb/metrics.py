"""Placement maps and balance metrics, shared by the whole project.

Conventions: ``phy2log`` is ``[L, R]`` (or ``[R]`` for one layer) int64, the logical expert held
by each physical slot, ``-1`` for an unused slot. Physical slot ``p`` lives on GPU
``p // (R / num_gpus)``. A logical expert with ``c`` copies sends ``load / c`` to each copy.
"""

from __future__ import annotations

import torch

from lplb import _C

__all__ = [
    "balancedness",
    "coefficient_of_variation",
    "count_duplicate_rows",
    "gpu_loads",
    "log2phy_from_ranks",
    "normalized_variance",
    "phy2log_to_log2phy",
]


def _as_layers(phy2log: torch.Tensor) -> torch.Tensor:
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


def _slots_per_gpu(num_slots: int, num_gpus: int) -> int:
    """Slots per GPU; ``num_gpus`` must divide ``num_slots``."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus <= 0:
        raise ValueError(f"num_gpus must be a positive int, got {num_gpus!r}")
    if num_slots % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} does not divide the {num_slots} physical slots")
    return num_slots // num_gpus


def _counts(p: torch.Tensor, num_logical: int) -> torch.Tensor:
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
    p = _as_layers(phy2log)
    top = int(p.max()) + 1 if p.numel() else 0
    if num_logical is None:
        num_logical = top
    elif num_logical < top:
        raise ValueError(f"phy2log holds expert {top - 1} but num_logical={num_logical}")
    logcnt = _counts(p, num_logical)
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


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load of every GPU when each copy of expert ``e`` carries ``weight[e] / logcnt[e]``.

    Args:
        weight: [L, E] (or [E]) per-expert load, any real dtype.
        phy2log: [L, R] (or [R]) placement, -1 for unused slots (they carry nothing).
        num_gpus: GPUs; slot ``p`` is on GPU ``p // (R / num_gpus)``.

    Returns:
        [L, num_gpus] float64 (``[num_gpus]`` for one-layer inputs). An expert without any copy
        contributes to no GPU. Each GPU's shares are added in ascending order, so the result
        does not depend on the order of slots within a GPU.
    """
    p = _as_layers(phy2log)
    w = torch.as_tensor(weight).to("cpu", torch.float64)
    w = w.reshape(-1, w.shape[-1])
    if w.shape[0] != p.shape[0]:
        raise ValueError(f"weight has {w.shape[0]} layers but phy2log has {p.shape[0]}")
    if p.numel() and int(p.max()) >= w.shape[1]:
        raise ValueError(f"phy2log holds expert {int(p.max())} but weight has {w.shape[1]}")
    per_gpu = _slots_per_gpu(p.shape[1], num_gpus)
    logcnt = _counts(p, w.shape[1])
    e = p.clamp(min=0)
    share = (w.gather(1, e) / logcnt.gather(1, e).clamp(min=1)).masked_fill(p < 0, 0.0)
    loads = share.reshape(p.shape[0], num_gpus, per_gpu).sort(-1).values.sum(-1)
    return loads[0] if torch.as_tensor(phy2log).dim() == 1 else loads


def _sorted_loads(loads: torch.Tensor) -> torch.Tensor:
    """Loads as float64, sorted along the GPU axis: statistics then do not depend on GPU order."""
    return torch.as_tensor(loads).to(torch.float64).sort(-1).values


def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """Mean GPU load divided by the maximum GPU load, per layer (1.0 = perfect).

    Args:
        loads: [..., num_gpus] GPU loads (e.g. from :func:`gpu_loads`).

    Returns:
        [...] float64 in [0, 1]; 1.0 for a layer without any load.
    """
    x = _sorted_loads(loads)
    top = x.amax(-1)
    return torch.where(top > 0, x.mean(-1) / torch.where(top > 0, top, 1.0), 1.0)


def coefficient_of_variation(loads: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of the GPU loads divided by their mean, per layer.

    Args:
        loads: [..., num_gpus] GPU loads.

    Returns:
        [...] float64 >= 0 (0.0 for a layer without any load).
    """
    x = _sorted_loads(loads)
    mean = x.mean(-1)
    std = x.std(-1, correction=0)
    return torch.where(mean > 0, std / torch.where(mean > 0, mean, 1.0), 0.0)


def normalized_variance(loads: torch.Tensor) -> torch.Tensor:
    """Population variance of the GPU loads divided by the squared mean, per layer.

    Equals ``coefficient_of_variation(loads) ** 2``.

    Args:
        loads: [..., num_gpus] GPU loads.

    Returns:
        [...] float64 >= 0 (0.0 for a layer without any load).
    """
    return coefficient_of_variation(loads).square()


def count_duplicate_rows(phy2log: torch.Tensor, num_gpus: int) -> int:
    """Number of (layer, GPU) rows that hold some logical expert more than once.

    Args:
        phy2log: [L, R] (or [R]) placement, -1 for unused slots (never counted as repeats).
        num_gpus: GPUs; each holds ``R / num_gpus`` consecutive slots.

    Returns:
        Count over all layers and GPUs (at most ``L * num_gpus``).
    """
    p = _as_layers(phy2log)
    per_gpu = _slots_per_gpu(p.shape[1], num_gpus)
    rows = p.reshape(-1, per_gpu).sort(dim=1).values
    repeat = (rows[:, 1:] == rows[:, :-1]) & (rows[:, 1:] >= 0)
    return int(repeat.any(dim=1).sum())
