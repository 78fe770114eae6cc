"""Physical layout of a Planner: which logical expert sits in which physical slot.

Pure arithmetic on CPU int64 tensors, kept apart from the Planner (which orchestrates the ops)
so that it can be read and tested on its own. Layout rules: docs/lp.md, "Physical layout".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eplb

__all__ = ["Layout", "expert_order", "redundancy_layout"]


@dataclass(frozen=True)
class Layout:
    """Maps of one layout, all CPU int64.

    Attributes:
        phy2log: [R] logical expert of each physical slot.
        log2phy: [E, 2] physical slot of the original and of the copy (-1 if none).
        logcnt: [E] physical copies of each expert (1 or 2).
        prob_index: [E] flat index ``global_rank * D + d`` into ``probs`` of each replicated
            expert's set, -1 for experts without a copy.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    prob_index: torch.Tensor


def expert_order(
    history: torch.Tensor | None,
    n_logical: int,
    ep_size: int,
    n_group: int,
    num_nodes: int,
) -> torch.Tensor:
    """Logical experts of every rank's original slots, heaviest first.

    Without a history, rank ``r`` holds experts ``r * E / ep_size`` onwards. With one, experts
    are spread over ranks as DeepSeek LPLB does: ``rebalance_experts(history[None], E, n_group,
    num_nodes, ep_size)`` (no replication; hierarchical, so expert groups stay on nodes, when
    ``n_group % num_nodes == 0``), then each rank's experts are sorted by history load,
    heaviest first (stable, so ties keep slot order).

    Args:
        history: optional [E] float64 CPU load history.
        n_logical: E.
        ep_size, n_group, num_nodes: EP ranks, redundancy groups and nodes.

    Returns:
        [ep_size, E / ep_size] int64.
    """
    if history is None:
        return torch.arange(n_logical).view(ep_size, -1)
    placed, _, _ = eplb.rebalance_experts(history[None], n_logical, n_group, num_nodes, ep_size)
    experts = placed[0].view(ep_size, -1)
    order = torch.sort(history[experts], dim=1, descending=True, stable=True).indices
    return experts.gather(1, order)


def redundancy_layout(
    experts: torch.Tensor, r2o: torch.Tensor, n_combined: int, n_local_routed: int
) -> Layout:
    """Copy the first ``C * D`` experts of every rank along ``r2o`` into redundant slots.

    Redundant slot ``n_local_logical + c * D + d`` of rank ``r`` copies original slot
    ``c * D + d`` of rank ``r2o[r, d]`` of the same group.

    Args:
        experts: [ep_size, n_local_logical] int64, each rank's original experts in slot order.
        r2o: [group_size, D] int64 topology.
        n_combined: C, experts per replicated set.
        n_local_routed: physical slots per rank (originals + copies).

    Returns:
        The Layout (CPU int64 maps).
    """
    ep, n_ll = experts.shape
    group_size, n_sets = r2o.shape
    n_rep = n_combined * n_sets
    n_logical = experts.numel()
    ranks = torch.arange(ep)
    # Global rank holding the original of rank r's d-th redundant set: [ep, D].
    source = (ranks // group_size * group_size)[:, None] + r2o[ranks % group_size]
    rep_slot = torch.arange(n_rep).view(n_combined, n_sets)
    copies = experts[source[:, None, :], rep_slot].reshape(ep, n_rep)
    phy2log = torch.cat([experts, copies], dim=1).reshape(-1)

    slot_ids = torch.arange(ep * n_local_routed).view(ep, n_local_routed)
    log2phy = torch.full((n_logical, 2), -1, dtype=torch.int64)
    log2phy[experts.reshape(-1), 0] = slot_ids[:, :n_ll].reshape(-1)
    log2phy[copies.reshape(-1), 1] = slot_ids[:, n_ll:].reshape(-1)
    logcnt = 1 + (log2phy[:, 1] >= 0).to(torch.int64)

    # Flat index g*G*D + r*D + d into probs equals global_rank*D + d.
    prob_index = torch.full((n_logical,), -1, dtype=torch.int64)
    prob_index[experts[:, :n_rep].reshape(-1)] = (
        ranks[:, None] * n_sets + torch.arange(n_rep) % n_sets
    ).reshape(-1)
    return Layout(phy2log, log2phy, logcnt, prob_index)
