"""Plain-loop reference of DeepSeek's EPLB algorithm (deepseek-ai/EPLB ``eplb.py``).

A readable version of what ``eplb.rebalance_experts(policy="deepseek")`` computes, written from
the algorithm's description (docs/eplb.md): one layer at a time, with Python lists and loops, no
C++ and no vectorisation. It is the oracle the tests hold ``eplb.rebalance_experts`` and the
module helpers (``eplb.balanced_packing``, ``eplb.replicate_experts``,
``eplb.rebalance_experts_hierarchical``) to, and the "loops" baseline of bench/bench_eplb.py. It
is slow (100-400 times the C++ core's time at DeepSeek-V3 scale, docs/eplb.md) and does not
validate its arguments: use ``eplb.rebalance_experts`` in real code.

All arithmetic is numpy float32 in the reference's order: group sums and pack sums accumulate
item by item, per-copy loads are ``load / count``. Equal weights are ordered by torch's default
descending sort, as the reference does (it matters: copies of an expert tie).

``best_duplicate_free_max`` is a brute-force oracle for ``policy="balanced"`` on tiny cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = [
    "balanced_packing",
    "best_duplicate_free_max",
    "rebalance_experts",
    "rebalance_layer",
    "replicate_experts",
]

F32 = np.float32


def balanced_packing(weights: list[F32], num_packs: int) -> tuple[list[int], list[int]]:
    """Pack n items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Items go heaviest first (ties: as torch's default sort leaves them) to the lightest pack that
    still has room (ties: lowest pack index). Returns (pack of each item, rank of each item in its
    pack).
    """
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    # The reference orders items with torch's default (unstable) descending sort; equal weights,
    # e.g. the copies of one expert, come out in that sort's order, not by index.
    order = torch.tensor(weights, dtype=torch.float32).sort(descending=True).indices.tolist()
    pack_load = [F32(0)] * num_packs
    pack_items = [0] * num_packs
    pack, rank = [0] * n, [0] * n
    for item in order:
        best = -1
        for p in range(num_packs):
            if pack_items[p] < per_pack and (best < 0 or pack_load[p] < pack_load[best]):
                best = p
        pack[item] = best
        rank[item] = pack_items[best]
        pack_load[best] = F32(pack_load[best] + weights[item])
        pack_items[best] += 1
    return pack, rank


def replicate_experts(weights: list[F32], num_phy: int) -> tuple[list[int], list[int], list[int]]:
    """Give ``num_phy - n`` extra copies, each to the expert with the largest load per copy.

    Returns (logical expert of each physical slot, replica rank of each slot, copies per expert).
    """
    n = len(weights)
    phy2log, rank, count = list(range(n)), [0] * n, [1] * n
    for _ in range(n, num_phy):
        best, best_load = 0, F32(weights[0] / F32(count[0]))
        for e in range(1, n):
            load = F32(weights[e] / F32(count[e]))
            if load > best_load:
                best, best_load = e, load
        phy2log.append(best)
        rank.append(count[best])
        count[best] += 1
    return phy2log, rank, count


def rebalance_layer(
    weights: list[F32], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[list[int], list[int], list[int]]:
    """Hierarchical EPLB of one layer (the global policy is num_groups = num_nodes = 1).

    Returns (phy2log [R], phyrank [R], logcnt [E]) as lists.
    """
    num_experts = len(weights)
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    per_node = num_experts // num_nodes
    phy_per_node = num_replicas // num_nodes
    phy_per_gpu = num_replicas // num_gpus

    group_load = []
    for g in range(num_groups):
        total = F32(0)
        for e in range(g * group_size, (g + 1) * group_size):
            total = F32(total + weights[e])
        group_load.append(total)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    # mlog: experts renumbered node by node.
    mlog2log = [0] * num_experts
    for e in range(num_experts):
        g = e // group_size
        mlog = (group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size
        mlog2log[mlog] = e

    phy2log, phyrank = [0] * num_replicas, [0] * num_replicas
    logcnt = [0] * num_experts
    for node in range(num_nodes):
        node_experts = mlog2log[node * per_node : (node + 1) * per_node]
        node_weights = [weights[e] for e in node_experts]
        phy2mlog, rank, count = replicate_experts(node_weights, phy_per_node)
        phy_load = [F32(node_weights[m] / F32(count[m])) for m in phy2mlog]
        pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
        for p in range(phy_per_node):
            slot = node * phy_per_node + pack[p] * phy_per_gpu + rank_in_pack[p]
            phy2log[slot] = node_experts[phy2mlog[p]]
            phyrank[slot] = rank[p]
        for m, e in enumerate(node_experts):
            logcnt[e] = count[m]
    return phy2log, phyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's ``rebalance_experts``: weight [L, E] -> (phy2log [L, R], log2phy [L, E, X],
    logcnt [L, E]) int64, log2phy padded with -1 to X = the largest copy count."""
    w = weight.detach().cpu().float().numpy()
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers = [
        rebalance_layer([F32(x) for x in row], num_replicas, num_groups, num_nodes, num_gpus)
        for row in w
    ]
    maxcnt = max(max(count) for _, _, count in layers)
    log2phy = [[[-1] * maxcnt for _ in range(w.shape[1])] for _ in layers]
    for layer, (phy2log, phyrank, _) in enumerate(layers):
        for p, (e, r) in enumerate(zip(phy2log, phyrank, strict=True)):
            log2phy[layer][e][r] = p
    return (
        torch.tensor([phy2log for phy2log, _, _ in layers], dtype=torch.int64),
        torch.tensor(log2phy, dtype=torch.int64),
        torch.tensor([count for _, _, count in layers], dtype=torch.int64),
    )


def best_duplicate_free_max(weights: list[float], num_gpus: int, slots_per_gpu: int) -> float:
    """Exhaustive search for tiny cases: the lowest heaviest-GPU load over every placement of
    copies of ``len(weights)`` experts into ``num_gpus`` GPUs of ``slots_per_gpu`` slots each,
    with every slot used, every expert present and no expert twice on one GPU (a copy of expert
    ``e`` with ``c`` copies carries ``weights[e] / c``)."""
    n = len(weights)
    best = [float("inf")]

    def counts(expert: int, left: int):
        if expert == n - 1:
            if 1 <= left <= num_gpus:
                yield (left,)
            return
        for c in range(1, min(num_gpus, left - (n - 1 - expert)) + 1):
            for rest in counts(expert + 1, left - c):
                yield (c, *rest)

    def place(order: list[int], share: list[float], count: tuple[int, ...], k: int, load, room):
        if k == len(order):
            best[0] = min(best[0], max(load))
            return
        e = order[k]
        for gpus in itertools.combinations(range(num_gpus), count[e]):
            if any(room[g] == 0 or load[g] + share[e] >= best[0] for g in gpus):
                continue
            for g in gpus:
                load[g] += share[e]
                room[g] -= 1
            place(order, share, count, k + 1, load, room)
            for g in gpus:
                load[g] -= share[e]
                room[g] += 1

    for count in counts(0, num_gpus * slots_per_gpu):
        share = [weights[e] / count[e] for e in range(n)]
        order = sorted(range(n), key=lambda e: -share[e])
        place(order, share, count, 0, [0.0] * num_gpus, [slots_per_gpu] * num_gpus)
    return best[0]
