"""CUDA solve against the CPU reference backend (lplb/reference.py) and the HiGHS optimum, on
thousands of random groups per topology and on edge cases."""

import numpy as np
import pytest
import torch
from lplb_cases import plain_and_reordered

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, Planner
from lplb.oracle import (
    N_LOGICAL,
    REDUNDANCY_CONFIGS,
    lp_loads,
    optimal_max_load,
    random_workloads,
    stack_layouts,
    stacked_loads,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# (r2o, ep_size, redundant slots per rank k), ids like CUBE_8P2E-ep32-k2.
CONFIGS = [pytest.param(r2o, ep, k, id=f"{n}-ep{ep}-k{k}") for n, r2o, ep, k in REDUNDANCY_CONFIGS]
N_PLAIN = 500  # workloads on the identity layout
N_HISTORIES, N_PER_HISTORY = 25, 20  # workloads on layouts reordered by a load history


def _solve_both(planner: Planner, workload: torch.Tensor, phy2log: torch.Tensor):
    """The CUDA kernel and the CPU reference on one solve call.

    Returns (probs_gpu, solved_gpu, probs_cpu, solved_cpu), probs as [n, G, D] float64 numpy.
    """
    args = (planner.r2o.to(torch.int32), planner.o2r.to(torch.int32))
    layout = (planner.n_local_logical, planner.n_local_routed, planner.n_combined)
    results = []
    for device in (CUDA, torch.device("cpu")):
        counter = torch.zeros(1, dtype=torch.int64, device=device)
        probs = torch.ops.lplb.solve(
            workload.to(device),
            phy2log.to(device, torch.int32),
            *(a.to(device) for a in args),
            counter,
            list(layout),
        )
        results += [probs.cpu().double().numpy().reshape(-1, *planner.r2o.shape), int(counter)]
    return tuple(results)


def _check(
    planner: Planner, workloads: np.ndarray, phy2logs: list[torch.Tensor], same_probs: bool
) -> None:
    """Max loads of the kernel's and the reference's probs at the HiGHS optimum; with
    `same_probs` (loads exact in float64, e.g. counts below 2^53 in total) the kernel must
    also reproduce the reference's shares bit for bit, as it runs the same steps."""
    workload, phy2log = stack_layouts(workloads, phy2logs)
    gpu, solved_gpu, cpu, solved_cpu = _solve_both(planner, workload, phy2log)
    w, f = stacked_loads(planner, workloads, phy2logs)
    r2o = planner.r2o.numpy()
    ours = lp_loads(w, f, gpu, r2o).max(-1)
    theirs = lp_loads(w, f, cpu, r2o).max(-1)
    best = optimal_max_load(w, f, r2o)
    assert solved_gpu == solved_cpu == w.shape[0]
    assert np.all((gpu >= 0) & (gpu <= 1))
    scale = np.maximum(best, 1e-300)
    assert np.max(np.abs(ours - theirs) / scale) <= 1e-6
    assert np.max(np.abs(ours - best) / scale) <= 1e-6
    if same_probs:
        differ = np.argwhere(gpu != cpu)
        assert differ.size == 0, f"{len(differ)} shares differ, first at {differ[0]}"


@pytest.mark.parametrize(("r2o", "ep", "k"), CONFIGS)
def test_solve_matches_reference_and_optimum(r2o: torch.Tensor, ep: int, k: int) -> None:
    rng = np.random.default_rng(7000 + 100 * ep + 10 * k + r2o.shape[0])
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    workloads, phy2logs = plain_and_reordered(planner, rng, N_PLAIN, N_HISTORIES, N_PER_HISTORY)
    _check(planner, workloads, phy2logs, same_probs=True)


def _edge_workloads(rng: np.random.Generator) -> np.ndarray:
    """Zeros, one hot expert, a few hot experts, huge counts, tiny counts: [K, E] int64."""
    cases = [np.zeros(N_LOGICAL, dtype=np.int64)]
    for expert in (0, 1, 37, 255):
        hot = np.zeros(N_LOGICAL, dtype=np.int64)
        hot[expert] = 1000
        cases.append(hot)
    few = np.zeros(N_LOGICAL, dtype=np.int64)
    few[rng.choice(N_LOGICAL, 5, replace=False)] = rng.integers(1, 10**6, 5)
    cases.append(few)
    base = random_workloads(rng, 4, N_LOGICAL)[:, 0]
    cases += list(base * 2**40 + np.arange(N_LOGICAL))
    cases += list(np.minimum(base, 1))
    return np.stack(cases)


@pytest.mark.parametrize(("r2o", "ep", "k"), CONFIGS)
def test_solve_edge_cases(r2o: torch.Tensor, ep: int, k: int) -> None:
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    workloads = _edge_workloads(np.random.default_rng(ep + k))
    # Counts near 2^40 per expert: W and F sums round, in another order on the CPU.
    _check(planner, workloads, [planner.phy2log] * len(workloads), same_probs=False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_solve_workload_dtypes(dtype: torch.dtype) -> None:
    planner = Planner(CUBE_8P2E, N_LOGICAL + 64, N_LOGICAL, ep_size=32)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(3), 1, N_LOGICAL)[0, 0])
    gpu, solved_gpu, cpu, solved_cpu = _solve_both(planner, workload.to(dtype), planner.phy2log)
    assert solved_gpu == solved_cpu == planner.n_group
    w, f = stacked_loads(planner, workload.numpy()[None], [planner.phy2log])
    r2o = planner.r2o.numpy()
    np.testing.assert_allclose(lp_loads(w, f, gpu, r2o), lp_loads(w, f, cpu, r2o), rtol=1e-6)


def test_non_finite_group_fails_like_reference() -> None:
    planner = Planner(CUBE_8P2E, N_LOGICAL + 64, N_LOGICAL, ep_size=32)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(4), 1, N_LOGICAL)[0, 0])
    workload = workload.to(torch.float32)
    workload[3] = float("nan")  # expert 3 lives in group 0
    gpu, solved_gpu, cpu, solved_cpu = _solve_both(planner, workload, planner.phy2log)
    assert solved_gpu == solved_cpu == planner.n_group - 1
    assert np.all(gpu[0] == 0.5) and np.all(cpu[0] == 0.5)
    assert not np.all(gpu[1:] == 0.5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_avail_counter_accumulates(dtype: torch.dtype) -> None:
    planner = Planner(HYPERCUBE_16P2E, N_LOGICAL + 64, N_LOGICAL, ep_size=32)
    workload = torch.from_numpy(random_workloads(np.random.default_rng(5), 1, N_LOGICAL)[0, 0])
    counter = torch.full((1,), 7, dtype=dtype, device=CUDA)
    for _ in range(3):
        planner.solve_probs(workload.to(CUDA), counter)
    assert counter.dtype == dtype
    assert int(counter) == 7 + 3 * planner.n_group


def test_bad_sizes_raise_before_launch() -> None:
    planner = Planner(CUBE_8P2E, N_LOGICAL + 64, N_LOGICAL, ep_size=32)
    maps = planner._device_maps(CUDA)
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    workload = torch.ones(N_LOGICAL, dtype=torch.int32, device=CUDA)
    layout = (planner.n_local_logical, planner.n_local_routed, planner.n_combined)
    wide = torch.zeros((8, 5), dtype=torch.int32, device=CUDA)
    with pytest.raises(ValueError, match="D must be in"):
        torch.ops.lplb.solve(workload, maps.phy2log, wide, wide, counter, list(layout))
    big = torch.zeros((33, 2), dtype=torch.int32, device=CUDA)
    slots = torch.zeros(33 * planner.n_local_routed, dtype=torch.int32, device=CUDA)
    with pytest.raises(ValueError, match="group size"):
        torch.ops.lplb.solve(workload, slots, big, big, counter, list(layout))
    with pytest.raises(ValueError, match="phy2log"):
        torch.ops.lplb.solve(workload, maps.phy2log[:-1], maps.r2o, maps.o2r, counter, list(layout))
    with pytest.raises(TypeError, match="avail_counter"):
        torch.ops.lplb.solve(
            workload, maps.phy2log, maps.r2o, maps.o2r, counter.float(), list(layout)
        )
