"""Balance metrics of placements, shared by the whole project.

Conventions: ``phy2log`` is ``[L, R]`` (or ``[R]`` for one layer) int64, the logical expert held
by each physical slot, ``-1`` for an unused slot. Physical slot ``p`` lives on GPU
``p // (R / num_gpus)``. A logical expert with ``c`` copies sends ``load / c`` to each copy.
"""

from __future__ import annotations

import torch

from eplb.checks import loads as checked_loads
from eplb.checks import positive_int
from eplb.maps import as_layers, expert_counts

__all__ = [
    "balancedness",
    "coefficient_of_variation",
    "count_duplicate_rows",
    "gpu_loads",
    "normalized_variance",
]


def _slots_per_gpu(num_slots: int, num_gpus: int) -> int:
    """Slots per GPU; ``num_gpus`` must divide ``num_slots``."""
    num_gpus = positive_int("num_gpus", num_gpus)
    if num_slots % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} does not divide the {num_slots} physical slots")
    return num_slots // num_gpus


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
    p = as_layers(phy2log)
    w = checked_loads("weight", weight).to(torch.float64)
    if w.dim() not in (1, 2):
        raise ValueError(f"weight must be [E] or [L, E], got shape {tuple(w.shape)}")
    w = w.reshape(-1, w.shape[-1])
    if w.shape[0] != p.shape[0]:
        raise ValueError(f"weight has {w.shape[0]} layers but phy2log has {p.shape[0]}")
    if int(p.max()) >= w.shape[1]:
        raise ValueError(f"phy2log holds expert {int(p.max())} but weight has {w.shape[1]}")
    per_gpu = _slots_per_gpu(p.shape[1], num_gpus)
    logcnt = expert_counts(p, w.shape[1])
    e = p.clamp(min=0)
    share = (w.gather(1, e) / logcnt.gather(1, e).clamp(min=1)).masked_fill(p < 0, 0.0)
    loads = share.reshape(p.shape[0], num_gpus, per_gpu).sort(-1).values.sum(-1)
    return loads[0] if torch.as_tensor(phy2log).dim() == 1 else loads


def _sorted_loads(gpu_load: object) -> torch.Tensor:
    """GPU loads ([..., num_gpus], at least 1-D, finite, non-negative) as float64, sorted along
    the GPU axis: statistics then do not depend on GPU order."""
    x = checked_loads("loads", gpu_load)
    if x.dim() == 0:
        raise ValueError("loads must be [..., num_gpus], got a 0-d tensor")
    return x.to(torch.float64).sort(-1).values


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
    p = as_layers(phy2log)
    per_gpu = _slots_per_gpu(p.shape[1], num_gpus)
    rows = p.reshape(-1, per_gpu).sort(dim=1).values
    repeat = (rows[:, 1:] == rows[:, :-1]) & (rows[:, 1:] >= 0)
    return int(repeat.any(dim=1).sum())
