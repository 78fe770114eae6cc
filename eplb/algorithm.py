"""Expert replication and placement (EPLB), DeepSeek-compatible, with a C++ core.

``rebalance_experts`` validates its arguments and hands contiguous CPU tensors to ``eplb._C``
(csrc/eplb/), which runs the per-layer algorithms.

* ``policy="deepseek"`` (default) reproduces deepseek-ai/EPLB ``eplb.rebalance_experts``: the same
  float32 arithmetic in the same order and the same sort as torch's, so the outputs are
  identical, ``log2phy`` included (the copies of an expert always tie in that sort).
* ``policy="balanced"`` never puts two copies of one expert on one GPU and leaves the heaviest GPU
  of every layer no heavier than the DeepSeek placement does, except where no duplicate-free
  placement can (docs/eplb.md gives such a case and how rare it is); it can also stay close to
  an old placement.
"""

from __future__ import annotations

import torch

from eplb import _C
from eplb.checks import MAX_SLOTS, LayoutError, int_tensor, loads, positive_int, readable
from eplb.maps import _log2phy, phy2log_to_log2phy

__all__ = [
    "POLICIES",
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]

POLICIES = ("deepseek", "balanced")
# The largest float32: the DeepSeek algorithm sums loads in float32, and a sum past it is inf.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _checked_weight(weight: object) -> torch.Tensor:
    """Loads as a CPU tensor of their own dtype; [L, E], finite, non-negative, int or float, and
    every layer's total below the float32 maximum (the algorithm sums in float32)."""
    w = loads("weight", weight, ndim=2)
    # Only a layer whose largest load times its expert count passes the limit can overflow.
    if float(w.max()) * w.shape[1] > _FLOAT32_MAX:
        total = float(w.double().sum(1).max())
        if total > _FLOAT32_MAX:
            raise ValueError(
                f"weight has a layer totalling {total:.3g}, beyond float32 ({_FLOAT32_MAX:.3g}), "
                "in which the algorithm sums loads"
            )
    return w


def _checked_old(
    old_phy2log: object, num_layers: int, num_replicas: int, num_experts: int
) -> torch.Tensor:
    """Old placement as a contiguous CPU int64 [L, R] tensor with ids in [-1, E)."""
    old = readable("old_phy2log", int_tensor("old_phy2log", old_phy2log, convert=True))
    if tuple(old.shape) != (num_layers, num_replicas):
        raise ValueError(
            f"old_phy2log must have shape {(num_layers, num_replicas)}, got {tuple(old.shape)}"
        )
    old = old.to("cpu", torch.int64).contiguous()
    low, high = int(old.min()), int(old.max())
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        raise ValueError(f"old_phy2log holds {bad}; ids must be in [0, {num_experts}) or -1")
    return old


def _check_sizes(
    num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    """The size rules of the hierarchical algorithm (the global one is groups = nodes = 1)."""
    if num_replicas % num_gpus:
        raise LayoutError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_replicas < num_experts:
        raise LayoutError(f"num_replicas={num_replicas} is below the {num_experts} experts")
    if num_groups % num_nodes:
        raise LayoutError(f"num_groups={num_groups} is not a multiple of num_nodes={num_nodes}")
    if num_gpus % num_nodes:
        raise LayoutError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_experts % num_groups:
        raise LayoutError(f"num_groups={num_groups} does not divide the {num_experts} experts")


def _deepseek(
    w: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's hierarchical algorithm on checked CPU loads ``w`` [L, E] (any real dtype).

    Returns phy2log [L, R], phyrank [L, R] and logcnt [L, E], all int64.
    """
    num_layers, num_experts = w.shape
    # Group sums exactly as the reference computes them (torch, float32, on the unflattened view).
    w32 = w.float()
    group_load = w32.unflatten(-1, (num_groups, num_experts // num_groups)).sum(-1).contiguous()
    w32 = w32.contiguous()
    phy2log = torch.empty(num_layers, num_replicas, dtype=torch.int64)
    phyrank = torch.empty_like(phy2log)
    logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64)
    sizes = (num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    _C.eplb_deepseek(
        w32.data_ptr(),
        group_load.data_ptr(),
        *sizes,
        phy2log.data_ptr(),
        phyrank.data_ptr(),
        logcnt.data_ptr(),
    )
    return phy2log, phyrank, logcnt


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's ``balanced_packing``: pack ``n`` weighted items into ``num_packs`` packs of
    exactly ``n / num_packs`` items each, heaviest first into the lightest pack with room.

    Args:
        weight: [X, n] item weights (compared in float32, as the reference sorts them).
        num_packs: packs per row; must divide ``n``.

    Returns:
        pack_index: [X, n] int64, pack of each item.
        rank_in_pack: [X, n] int64, position of each item in its pack.
        On ``weight``'s device.
    """
    w = _checked_weight(weight)
    num_packs = positive_int("num_packs", num_packs)
    rows, n = w.shape
    if n % num_packs:
        raise LayoutError(f"num_packs={num_packs} does not divide the {n} items")
    w32 = w.float().contiguous()
    pack = torch.empty(rows, n, dtype=torch.int64)
    rank = torch.empty_like(pack)
    _C.balanced_packing(w32.data_ptr(), rows, n, num_packs, pack.data_ptr(), rank.data_ptr())
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    return pack.to(device), rank.to(device)


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's ``replicate_experts``: the first ``n`` slots hold experts ``0..n-1``; each further
    slot copies the expert with the largest load per copy (float32; ties to the lowest index).

    Args:
        weight: [X, n] expert loads.
        num_phy: physical slots per row, ``>= n``.

    Returns:
        phy2log: [X, num_phy] int64, expert of each slot.
        rank: [X, num_phy] int64, which copy of its expert each slot holds.
        logcnt: [X, n] int64, copies of each expert.
        On ``weight``'s device.
    """
    w = _checked_weight(weight)
    num_phy = positive_int("num_phy", num_phy, maximum=MAX_SLOTS)
    rows, n = w.shape
    if num_phy < n:
        raise LayoutError(f"num_phy={num_phy} is below the {n} experts")
    w32 = w.float().contiguous()
    phy2log = torch.empty(rows, num_phy, dtype=torch.int64)
    rank = torch.empty_like(phy2log)
    logcnt = torch.empty(rows, n, dtype=torch.int64)
    _C.replicate_experts(
        w32.data_ptr(), rows, n, num_phy, phy2log.data_ptr(), rank.data_ptr(), logcnt.data_ptr()
    )
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    return phy2log.to(device), rank.to(device), logcnt.to(device)


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's ``rebalance_experts_hierarchical``: groups to nodes, replicas within nodes,
    replicas to GPUs.

    Args:
        weight: [L, E] expert loads (finite, non-negative).
        num_physical_experts: R, a multiple of ``num_gpus`` and ``>= E``.
        num_groups: expert groups, dividing E; a multiple of ``num_nodes``.
        num_nodes: server nodes, dividing ``num_gpus``.
        num_gpus: GPUs.

    Returns:
        phy2log: [L, R] int64; phyrank: [L, R] int64 (copy index of each slot);
        logcnt: [L, E] int64. On the CPU.
    """
    w = _checked_weight(weight)
    num_replicas = positive_int("num_physical_experts", num_physical_experts, maximum=MAX_SLOTS)
    num_groups = positive_int("num_groups", num_groups)
    num_nodes = positive_int("num_nodes", num_nodes)
    num_gpus = positive_int("num_gpus", num_gpus)
    _check_sizes(w.shape[1], num_replicas, num_groups, num_nodes, num_gpus)
    return _deepseek(w, num_replicas, num_groups, num_nodes, num_gpus)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "deepseek",
    old_phy2log: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Replicate logical experts into physical slots and place the slots on GPUs.

    The hierarchical policy applies when ``num_nodes`` divides ``num_groups``: expert groups are
    packed onto nodes, experts are replicated within each node, and the copies are packed onto the
    node's GPUs. Otherwise the global policy treats all experts as one group on one node.

    Args:
        weight: [L, E] load statistics per layer and logical expert; any device, int or float
            dtype, finite and non-negative.
        num_replicas: R, physical experts per layer; a multiple of ``num_gpus`` and >= E.
        num_groups: expert groups (hierarchical policy only: must divide E).
        num_nodes: server nodes; must divide ``num_gpus``.
        num_gpus: GPUs; GPU ``g`` holds slots ``[g * R / num_gpus, (g + 1) * R / num_gpus)``.
        policy: ``"deepseek"`` (exact reference behaviour) or ``"balanced"`` (no expert twice on a
            GPU, copies capped at the GPUs an expert may use, heaviest GPU no heavier than the
            reference's wherever a duplicate-free placement allows; needs ``R / num_gpus`` <=
            experts per node).
        old_phy2log: [L, R] integer, the placement in use now, -1 for unused slots
            (``policy="balanced"`` only). GPUs (within nodes, nodes as units) and slots of the
            result are arranged to keep experts where they are, and a placement grown from the
            old one is preferred when it changes fewer slots and balances as well.

    Returns:
        phy2log: [L, R] int64, logical expert of every physical slot.
        log2phy: [L, E, max(logcnt)] int64, physical slots of every logical expert, -1 padded.
        logcnt: [L, E] int64, copies of every logical expert.
        num_changed: [L] int64, slots whose expert differs from ``old_phy2log`` (only returned
            when ``old_phy2log`` is given).
        All on the CPU.
    """
    w = _checked_weight(weight)
    num_replicas = positive_int("num_replicas", num_replicas, maximum=MAX_SLOTS)
    num_groups = positive_int("num_groups", num_groups)
    num_nodes = positive_int("num_nodes", num_nodes)
    num_gpus = positive_int("num_gpus", num_gpus)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if old_phy2log is not None and policy != "balanced":
        raise ValueError(f"old_phy2log needs policy='balanced', got policy={policy!r}")
    num_layers, num_experts = w.shape
    if num_groups % num_nodes:
        num_groups = num_nodes = 1  # the global policy ignores the node count, as DeepSeek's does
    _check_sizes(num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    per_gpu = num_replicas // num_gpus
    if policy == "balanced" and per_gpu > num_experts // num_nodes:
        raise ValueError(
            f"policy='balanced' needs at most {num_experts // num_nodes} slots per GPU (the "
            f"experts per node) to avoid repeats, got num_replicas/num_gpus={per_gpu}"
        )
    old = None
    if old_phy2log is not None:
        old = _checked_old(old_phy2log, num_layers, num_replicas, num_experts)

    phy2log, phyrank, logcnt = _deepseek(w, num_replicas, num_groups, num_nodes, num_gpus)
    if policy == "deepseek":
        # The C++ core's ranks and counts are consistent by construction: no need to check.
        return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt

    w64 = w.double().contiguous()
    placed = torch.empty_like(phy2log)
    num_changed = torch.zeros(num_layers, dtype=torch.int64)
    sizes = (num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    _C.eplb_balanced(
        w64.data_ptr(),
        *sizes,
        phy2log.data_ptr(),
        0 if old is None else old.data_ptr(),
        placed.data_ptr(),
        0 if old is None else num_changed.data_ptr(),
    )
    log2phy, logcnt = phy2log_to_log2phy(placed, num_experts)
    if old is None:
        return placed, log2phy, logcnt
    return placed, log2phy, logcnt, num_changed
