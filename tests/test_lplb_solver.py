"""The CPU LP solver (torch.ops.lplb.solve, lplb.reference) against HiGHS and hand-solved LPs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lplb_cases import plain_and_reordered

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, reference, torus_2d
from lplb.oracle import (
    N_LOGICAL,
    REDUNDANCY_CONFIGS,
    lp_loads,
    optimal_max_load,
    random_workloads,
    stack_layouts,
    stacked_loads,
)

# (r2o, ep_size, redundant slots per rank k), ids like CUBE_8P2E-ep32-k2.
CONFIGS = [pytest.param(r2o, ep, k, id=f"{n}-ep{ep}-k{k}") for n, r2o, ep, k in REDUNDANCY_CONFIGS]
N_PLAIN = 500  # workloads on the identity layout
N_HISTORIES, N_PER_HISTORY = 50, 10  # workloads on layouts reordered by a load history


def _solve_stacked(planner: Planner, workloads: np.ndarray, phy2logs: list[torch.Tensor]):
    """One solve call for many workloads: workload i and its layout become groups of one EP.

    Returns probs [K, n_group, G, D] float32 and the avail_counter value.
    """
    workload, phy2log = stack_layouts(workloads, phy2logs)
    counter = torch.zeros(1, dtype=torch.int64)
    probs = torch.ops.lplb.solve(
        workload,
        phy2log.to(torch.int32),
        planner.r2o.to(torch.int32),
        planner.o2r.to(torch.int32),
        counter,
        [planner.n_local_logical, planner.n_local_routed, planner.n_combined],
    )
    shape = (len(workloads), planner.n_group, planner.group_size, planner.n_sets)
    return probs.view(shape), int(counter)


@pytest.mark.parametrize(("r2o", "ep", "k"), CONFIGS)
def test_max_load_matches_highs_optimum(r2o: torch.Tensor, ep: int, k: int) -> None:
    rng = np.random.default_rng(1000 * ep + 10 * k + r2o.shape[0])
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    workloads, phy2logs = plain_and_reordered(planner, rng, N_PLAIN, N_HISTORIES, N_PER_HISTORY)

    probs, solved = _solve_stacked(planner, workloads, phy2logs)

    w, f = stacked_loads(planner, workloads, phy2logs)
    x = probs.reshape(-1, *r2o.shape).double().numpy()
    ours = lp_loads(w, f, x, r2o.numpy()).max(-1)
    best = optimal_max_load(w, f, r2o.numpy())
    rel = np.abs(ours / best - 1.0)
    assert solved == w.shape[0]
    assert np.all((x >= 0) & (x <= 1))
    # Exact up to the float32 rounding of probs (the solver itself lands within 1e-14).
    assert rel.max() <= 1e-6, f"max {rel.max():.2e}"


def _inverse(r2o: torch.Tensor) -> torch.Tensor:
    o2r = torch.empty_like(r2o)
    for d in range(r2o.shape[1]):
        o2r[r2o[:, d], d] = torch.arange(r2o.shape[0])
    return o2r


PAIR = torch.tensor([[1], [0]])  # two ranks copying each other's one set


@pytest.mark.parametrize(
    ("w", "f", "best"),
    [
        # Only rank 0 has tokens, all replicated: half of them move to rank 1.
        ([[10.0], [0.0]], [0.0, 0.0], 5.0),
        # x1 = 1, x0 = 0.4 gives loads 4 + 4 + 0 = 8 and 0 + 2 + 6 = 8, the mean.
        ([[10.0], [2.0]], [4.0, 0.0], 8.0),
        # Rank 0's fixed load alone exceeds the mean: everything replicated leaves it.
        ([[3.0], [1.0]], [9.0, 0.0], 9.0),
    ],
)
def test_hand_solved_two_rank_cases(w: list, f: list, best: float) -> None:
    wt, ft = torch.tensor([w]), torch.tensor([f])
    result = reference.flow_solve(wt, ft, PAIR, _inverse(PAIR))
    loads = lp_loads(wt.double().numpy(), ft.double().numpy(), result.x.numpy(), PAIR.numpy())
    assert bool(result.converged.all())
    assert loads.max() == pytest.approx(best, rel=1e-8)


def _identity_planner(r2o: torch.Tensor = CUBE_8P2E, ep: int = 32, k: int = 2) -> Planner:
    return Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)


def _planner_solve(planner: Planner, workload: torch.Tensor, **kwargs) -> tuple[torch.Tensor, int]:
    counter = torch.zeros(1, dtype=torch.int64)
    probs = reference.solve(
        workload,
        planner.phy2log,
        planner.r2o,
        planner.o2r,
        counter,
        planner.n_local_logical,
        planner.n_local_routed,
        planner.n_combined,
        **kwargs,
    )
    return probs, int(counter)


def _check_against_highs(planner: Planner, workload: torch.Tensor, probs: torch.Tensor) -> None:
    w, f = stacked_loads(planner, workload.numpy()[None], [planner.phy2log])
    ours = lp_loads(w, f, probs.double().numpy(), planner.r2o.numpy()).max(-1)
    best = optimal_max_load(w, f, planner.r2o.numpy())
    np.testing.assert_allclose(ours, best, rtol=1e-6)


def test_all_zero_workload_is_solved_with_even_split() -> None:
    planner = _identity_planner()
    probs, solved = _planner_solve(planner, torch.zeros(N_LOGICAL, dtype=torch.int32))
    assert torch.equal(probs, torch.full_like(probs, 0.5))
    assert solved == planner.n_group


@pytest.mark.parametrize("expert", [0, 9, 255])
def test_single_hot_expert(expert: int) -> None:
    planner = _identity_planner(torus_2d(8, 4), ep=32, k=4)
    workload = torch.zeros(N_LOGICAL, dtype=torch.int64)
    workload[expert] = 1000
    probs, solved = _planner_solve(planner, workload)
    assert solved == planner.n_group
    assert bool(probs.isfinite().all())
    _check_against_highs(planner, workload, probs)


def test_huge_counts() -> None:
    planner = _identity_planner(HYPERCUBE_16P2E, ep=16, k=4)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(7), 1, N_LOGICAL)[0, 0])
    workload = workload * 2**40 + torch.arange(N_LOGICAL)
    probs, solved = _planner_solve(planner, workload)
    assert solved == planner.n_group
    _check_against_highs(planner, workload, probs)


def test_replicated_sets_without_tokens() -> None:
    planner = _identity_planner(CUBE_8P2E, ep=32, k=4)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(8), 1, N_LOGICAL)[0, 0])
    replicated = planner.prob_index >= 0
    workload[replicated] = 0
    # Set 1 of every rank keeps tokens in half the groups, set 0 is empty everywhere.
    first_half = planner.phy2log.view(planner.ep_size, -1)[:16, 1 : 2 * planner.n_combined : 2]
    workload[first_half.reshape(-1)] = 300
    probs, solved = _planner_solve(planner, workload)
    assert solved == planner.n_group
    assert bool(((probs >= 0) & (probs <= 1)).all())
    _check_against_highs(planner, workload, probs)


@pytest.mark.parametrize("shape", [(1,), ()])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_avail_counter_accumulates_solved_groups(dtype: torch.dtype, shape: tuple) -> None:
    planner = _identity_planner(CUBE_8P2E, ep=64, k=2)
    counter = torch.full(shape, 5, dtype=dtype)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(9), 1, N_LOGICAL)[0, 0])
    for _ in range(2):
        planner.solve_probs(workload, counter)
    assert counter.dtype == dtype
    assert int(counter) == 5 + 2 * planner.n_group


def test_failed_groups_fall_back_to_even_split_and_are_not_counted() -> None:
    planner = _identity_planner(CUBE_8P2E, ep=32, k=2)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(10), 1, N_LOGICAL)[0, 0])
    # Group 1 has no tokens: solved at once whatever the search cap.
    workload[planner.phy2log.view(4, -1)[1]] = 0
    probs, solved = _planner_solve(planner, workload, max_searches=0)
    assert solved == 1
    assert torch.equal(probs, torch.full_like(probs, 0.5))
    result = reference.flow_solve(
        *_random_sets(11, 6, RING_8P), RING_8P, _inverse(RING_8P), max_searches=0
    )
    assert not bool(result.converged.any())
    assert torch.equal(result.x, torch.full_like(result.x, 0.5))
    assert result.searches.tolist() == [0] * 6


def _random_sets(seed: int, batch: int, r2o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, *r2o.shape, generator=gen, dtype=torch.float64)
    return w, torch.rand(batch, r2o.shape[0], generator=gen, dtype=torch.float64)


def test_no_nan_on_degenerate_groups() -> None:
    w, f = _random_sets(12, 8, RING_8P)
    w[0], f[0] = 0.0, 0.0  # nothing at all
    w[1] = 0.0  # fixed loads only
    f[2] = 0.0  # replicated loads only
    w[3, :4] = 0.0  # some sets empty
    w[4], f[4] = w[4] * 1e-300, f[4] * 1e-300  # tiny loads
    w[5], f[5] = 1.0, 1.0  # perfectly balanced already
    result = reference.flow_solve(w, f, RING_8P, _inverse(RING_8P))
    assert bool(result.x.isfinite().all())
    assert bool(result.converged.all())
    x = result.x.numpy()
    best = optimal_max_load(w.numpy(), f.numpy(), RING_8P.numpy())
    ours = lp_loads(w.numpy(), f.numpy(), x, RING_8P.numpy()).max(-1)
    np.testing.assert_allclose(ours, best, rtol=1e-7)


def _densest_subset_load(w: np.ndarray, f: np.ndarray, r2o: np.ndarray) -> float:
    """The optimum by brute force: max over rank sets S of (F(S) + W(sets inside S)) / |S|.

    Every set's tokens stay inside S when both its ranks are in S, so some rank of S carries at
    least that mean; the LP's optimum equals the largest such mean (max-flow/min-cut duality).
    """
    g, n_sets = w.shape
    best = 0.0
    for mask in range(1, 1 << g):
        inside = [(mask >> r) & 1 for r in range(g)]
        total = sum(f[r] for r in range(g) if inside[r])
        for q in range(g):
            for d in range(n_sets):
                holder = int(np.flatnonzero(r2o[:, d] == q)[0])
                if inside[q] and inside[holder]:
                    total += w[q, d]
        best = max(best, total / sum(inside))
    return best


@st.composite
def _small_groups(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w [G, D], f [G], r2o [G, D]): columns are permutations without fixed points."""
    g = draw(st.integers(2, 7))
    n_sets = draw(st.integers(1, 3))
    cols = []
    for _ in range(n_sets):
        perm = draw(st.permutations(range(g)))
        if any(perm[r] == r for r in range(g)):
            perm = [(r + 1) % g for r in range(g)]
        cols.append(perm)
    r2o = np.array(cols, dtype=np.int64).T
    value = st.one_of(st.just(0.0), st.floats(0.0, 1000.0), st.integers(0, 10**6).map(float))
    w = np.array(draw(st.lists(value, min_size=g * n_sets, max_size=g * n_sets))).reshape(g, -1)
    f = np.array(draw(st.lists(value, min_size=g, max_size=g)))
    return w, f, r2o


@settings(max_examples=300, deadline=None)
@given(_small_groups())
def test_reaches_brute_force_optimum(group: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    w, f, r2o = group
    r2o_t = torch.from_numpy(r2o)
    result = reference.flow_solve(
        torch.from_numpy(w)[None], torch.from_numpy(f)[None], r2o_t, _inverse(r2o_t)
    )
    x = result.x.numpy()
    assert bool(result.converged.all())
    assert np.all((x >= 0) & (x <= 1))
    ours = lp_loads(w[None], f[None], x, r2o).max()
    best = _densest_subset_load(w, f, r2o)
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-300)
