"""Planner construction and physical layout (update_redundancy_mapping), checked slot by slot."""

import numpy as np
import pytest
import torch

import eplb
from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, torus_2d
from lplb.oracle import random_workloads

N_LOGICAL = 256


def _check_layout(planner: Planner, maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Every invariant of docs/lp.md "Physical layout", with plain loops over slots."""
    phy2log, log2phy, logcnt = maps
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int32  # as DeepSeek LPLB
    assert phy2log.shape == (planner.n_routed,)
    assert log2phy.shape == (N_LOGICAL, 2)
    g, d_sets = planner.r2o.shape
    n_ll, n_lr, n_c = planner.n_local_logical, planner.n_local_routed, planner.n_combined
    slots = phy2log.view(planner.ep_size, n_lr).tolist()
    originals = sorted(e for rank in slots for e in rank[:n_ll])
    assert originals == list(range(N_LOGICAL))
    expected_l2p = [[-1, -1] for _ in range(N_LOGICAL)]
    expected_prob_index = [-1] * N_LOGICAL
    for r in range(planner.ep_size):
        for j in range(n_ll):
            expected_l2p[slots[r][j]][0] = r * n_lr + j
            if j < n_c * d_sets:
                expected_prob_index[slots[r][j]] = (
                    (r // g) * g * d_sets + (r % g) * d_sets + j % d_sets
                )
        for c in range(n_c):
            for d in range(d_sets):
                source = (r // g) * g + int(planner.r2o[r % g, d])
                copy = slots[r][n_ll + c * d_sets + d]
                assert copy == slots[source][c * d_sets + d]
                expected_l2p[copy][1] = r * n_lr + n_ll + c * d_sets + d
    assert log2phy.tolist() == expected_l2p
    assert logcnt.tolist() == [1 + (b >= 0) for _, b in expected_l2p]
    assert planner.prob_index.tolist() == expected_prob_index


@pytest.mark.parametrize(
    ("r2o", "ep", "k"),
    [(CUBE_8P2E, 32, 2), (CUBE_8P2E, 64, 4), (HYPERCUBE_16P2E, 16, 4), (RING_8P, 32, 3)],
)
def test_identity_layout(r2o: torch.Tensor, ep: int, k: int) -> None:
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    maps = planner.update_redundancy_mapping()
    _check_layout(planner, maps)
    originals = maps[0].view(ep, -1)[:, : N_LOGICAL // ep]
    assert torch.equal(originals.reshape(-1), torch.arange(N_LOGICAL))


@pytest.mark.parametrize(
    ("r2o", "ep", "k", "nodes"),
    [
        (CUBE_8P2E, 32, 4, 1),
        (CUBE_8P2E, 32, 4, 4),  # hierarchical: n_group 4 on 4 nodes
        (CUBE_8P2E, 32, 2, 3),  # n_group 4 not divisible by 3 nodes: the global policy
        (torus_2d(8, 4), 32, 2, 1),
        (RING_8P, 16, 1, 2),
    ],
)
def test_reordered_layout_follows_eplb_and_history(
    r2o: torch.Tensor, ep: int, k: int, nodes: int
) -> None:
    """The reordering is DeepSeek LPLB's: rebalance_experts(w[None], E, n_group, nodes, ep)."""
    history = torch.from_numpy(random_workloads(np.random.default_rng(ep + k), 3, N_LOGICAL)[2, 0])
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep, num_nodes=nodes)
    maps = planner.update_redundancy_mapping(history)
    _check_layout(planner, maps)
    n_group = ep // r2o.shape[0]
    placed = eplb.rebalance_experts(history[None].double(), N_LOGICAL, n_group, nodes, ep)[0]
    n_ll = N_LOGICAL // ep
    originals = maps[0].view(ep, -1)[:, :n_ll]
    for rank in range(ep):
        ours = originals[rank].tolist()
        assert sorted(ours) == sorted(placed[0, rank * n_ll : (rank + 1) * n_ll].tolist())
        loads = history[ours].tolist()
        assert loads == sorted(loads, reverse=True)


def test_layout_resets_to_identity_without_history() -> None:
    planner = Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32)
    identity = planner.update_redundancy_mapping()
    planner.update_redundancy_mapping(torch.arange(N_LOGICAL).flip(0))
    again = planner.update_redundancy_mapping()
    assert all(torch.equal(a, b) for a, b in zip(identity, again, strict=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((CUBE_8P2E, 330, 256, 32), "multiples of ep_size"),  # n_routed not a multiple
        ((CUBE_8P2E, 320, 250, 32), "multiples of ep_size"),  # n_logical not a multiple
        ((CUBE_8P2E, 256, 256, 32), "got 0"),  # no redundant slot
        ((CUBE_8P2E, 288, 256, 32), "got 1"),  # 1 slot, not divisible by D = 2
        ((CUBE_8P2E, 64 + 80, 64, 8), "got 10"),  # C * D = 10 > 8 original experts
        ((CUBE_8P2E, 320, 256, 12), "ep_size"),  # not a multiple of group size 8
        ((CUBE_8P2E, 320, 256, 0), "ep_size"),
        ((CUBE_8P2E, 0, 256, 32), "n_routed_experts"),
    ],
)
def test_bad_planner_arguments_raise(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Planner(*args)


def test_bad_history_shape_raises() -> None:
    planner = Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32)
    with pytest.raises(ValueError, match=r"\[256\]"):
        planner.update_redundancy_mapping(torch.ones(1, N_LOGICAL))


def test_ep_size_defaults_to_group_size() -> None:
    planner = Planner(CUBE_8P2E, 64 + 16, 64)
    assert planner.ep_size == 8
    assert planner.n_group == 1


def test_num_nodes_defaults_to_lplb_rule_and_is_validated() -> None:
    planner = Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert planner.num_nodes == (max(1, 32 // gpus) if gpus else 1)
    with pytest.raises(ValueError, match="num_nodes"):
        Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32, num_nodes=0)
    with pytest.raises(TypeError, match="num_nodes"):
        Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32, num_nodes=2.0)


def test_group_must_be_a_process_group() -> None:
    with pytest.raises(TypeError, match="ProcessGroup"):
        Planner(CUBE_8P2E, 320, N_LOGICAL, ep_size=32, group=object())
