"""Token counting and mapping of the Planner (CPU) against plain-loop references."""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from lplb import CUBE_8P2E, RING_8P, Planner, torus_2d
from lplb.oracle import random_workloads

N_LOGICAL = 64


def _planner(r2o: torch.Tensor = CUBE_8P2E, ep: int = 8, k: int = 2) -> Planner:
    return Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)


def _skewed_idx(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Indices drawn from a Zipf-like popularity, with about 5 % of -1 entries."""
    rng = np.random.default_rng(seed)
    popularity = random_workloads(rng, 3, N_LOGICAL)[2, 0] + 1.0
    values = rng.choice(N_LOGICAL, size=shape, p=popularity / popularity.sum())
    values[rng.random(shape) < 0.05] = -1
    return torch.from_numpy(values).to(dtype)


def _loop_counts(flat: list[int], n_sms: int) -> tuple[list[int], list[list[int]]]:
    chunk = max(1, math.ceil(len(flat) / n_sms))
    total = [0] * N_LOGICAL
    prefix = []
    for s in range(n_sms):
        for e in flat[s * chunk : (s + 1) * chunk]:
            if e >= 0:
                total[e] += 1
        prefix.append(list(total))  # inclusive: row s counts chunks 0..s
    return total, prefix


def _loop_map(flat: list[int], planner: Planner, probs: torch.Tensor) -> list[int]:
    """docs/lp.md token mapping, one token at a time in flattened order."""
    shares = probs.reshape(-1).tolist()
    seen: dict[int, int] = defaultdict(int)
    out = []
    for e in flat:
        if e < 0:
            out.append(-1)
            continue
        k = seen[e]
        seen[e] += 1
        original, replica = planner.log2phy[e].tolist()
        p = int(planner.prob_index[e])
        if p < 0:
            out.append(original)
            continue
        x = shares[p]
        keep = math.floor((k + 1) * x + 0.5) > math.floor(k * x + 0.5)
        out.append(original if keep else replica)
    return out


@pytest.mark.parametrize("n_sms", [1, 3, 8, 1000])
@pytest.mark.parametrize("shape", [(0,), (1,), (257, 4), (5, 31, 3)])
def test_count_workload_matches_bincount_and_chunk_prefix(
    n_sms: int, shape: tuple[int, ...]
) -> None:
    idx = _skewed_idx(shape, torch.int64, seed=sum(shape) + n_sms)
    workload, by_sm = _planner().count_workload(idx, n_sms)
    total, prefix = _loop_counts(idx.reshape(-1).tolist(), n_sms)
    valid = idx[idx >= 0]
    assert workload.dtype == by_sm.dtype == torch.int32
    assert torch.equal(workload, torch.bincount(valid, minlength=N_LOGICAL).to(torch.int32))
    assert workload.tolist() == total
    assert by_sm.tolist() == prefix


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(4096, 8), (3001,), (3, 100, 6), (0, 8)])
@pytest.mark.parametrize("r2o", [CUBE_8P2E, RING_8P], ids=["cube", "ring"])
def test_run_matches_plain_loop_mapping(
    dtype: torch.dtype, shape: tuple[int, ...], r2o: torch.Tensor
) -> None:
    planner = _planner(r2o, ep=8, k=2)
    idx = _skewed_idx(shape, dtype, seed=len(shape) + 7)
    counter = torch.zeros(1, dtype=torch.int32)
    mapped = planner.run(idx, counter)
    probs, _ = planner.solve_probs(planner.count_workload(idx, 1)[0], torch.zeros_like(counter))
    assert mapped.dtype == dtype
    assert mapped.shape == idx.shape
    assert mapped.reshape(-1).tolist() == _loop_map(idx.reshape(-1).tolist(), planner, probs)
    assert int(counter) == planner.n_group


def test_mapping_conserves_tokens_and_follows_probs() -> None:
    planner = _planner(torus_2d(2, 4), ep=16, k=2)
    planner.update_redundancy_mapping(torch.arange(N_LOGICAL, dtype=torch.float32) % 7)
    idx = _skewed_idx((8192, 6), torch.int64, seed=3)
    workload, by_sm = planner.count_workload(idx, 5)
    probs, _ = planner.solve_probs(workload, torch.zeros(1, dtype=torch.int64))
    mapped = planner.weighted_select_target(idx, probs, by_sm, 5)

    assert torch.equal(mapped < 0, idx < 0)
    assert torch.equal(planner.phy2log[mapped[idx >= 0]], idx[idx >= 0])
    per_slot = torch.bincount(mapped[mapped >= 0], minlength=planner.n_routed)
    shares = probs.reshape(-1).double()
    moved = 0
    for e in range(N_LOGICAL):
        original, replica = planner.log2phy[e].tolist()
        n_e = int(workload[e])
        if replica < 0:
            assert int(per_slot[original]) == n_e
            continue
        x = float(shares[planner.prob_index[e]])
        assert int(per_slot[original]) + int(per_slot[replica]) == n_e
        assert int(per_slot[original]) == math.floor(n_e * x + 0.5)
        moved += int(per_slot[replica])
    assert moved > 0  # the skewed batch does use the copies


def test_mapping_spreads_targets_over_the_batch() -> None:
    planner = _planner()
    idx = torch.zeros(1000, dtype=torch.int64)  # one replicated expert only
    workload, by_sm = planner.count_workload(idx, 4)
    probs, _ = planner.solve_probs(workload, torch.zeros(1, dtype=torch.int64))
    mapped = planner.weighted_select_target(idx, probs, by_sm, 4)
    original = int(planner.log2phy[0, 0])
    x = float(probs.reshape(-1)[planner.prob_index[0]])
    kept = torch.cumsum((mapped == original).to(torch.float64), 0)
    expected = torch.arange(1, 1001, dtype=torch.float64) * x
    assert 0.0 < x < 1.0
    assert float((kept - expected).abs().max()) <= 0.5 + 1e-9


def test_result_is_deterministic_and_independent_of_n_sms() -> None:
    planner = _planner(CUBE_8P2E, ep=16, k=4)
    idx = _skewed_idx((2000, 8), torch.int32, seed=11)
    counter = torch.zeros(1, dtype=torch.int64)
    results = [planner.run(idx, counter, n_sms) for n_sms in (1, 2, 7, 132, 4096)]
    results.append(planner.run(idx, counter))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert int(counter) == len(results) * planner.n_group


@pytest.mark.parametrize("bad", [N_LOGICAL, -2, 10**6])
def test_out_of_range_index_raises(bad: int) -> None:
    idx = torch.zeros(10, 2, dtype=torch.int64)
    idx[3, 1] = bad
    with pytest.raises(ValueError, match=str(bad)):
        _planner().run(idx, torch.zeros(1, dtype=torch.int32))


def test_bad_arguments_raise() -> None:
    planner = _planner()
    idx = torch.zeros(16, dtype=torch.int64)
    counter = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="float32"):
        planner.run(idx.float(), counter)
    with pytest.raises(ValueError, match="n_sms"):
        planner.count_workload(idx, 0)
    with pytest.raises(ValueError, match=r"\[64\]"):
        planner.solve_probs(torch.zeros(63), counter)
    with pytest.raises(TypeError, match="avail_counter"):
        planner.solve_probs(torch.zeros(N_LOGICAL), counter.float())
    with pytest.raises(ValueError, match="one element"):
        planner.solve_probs(torch.zeros(N_LOGICAL), torch.zeros(2, dtype=torch.int32))
    workload, by_sm = planner.count_workload(idx, 4)
    probs, _ = planner.solve_probs(workload, counter)
    with pytest.raises(ValueError, match="workload_by_sm"):
        planner.weighted_select_target(idx, probs, by_sm, 3)
    with pytest.raises(ValueError, match="probs"):
        planner.weighted_select_target(idx, probs[:, :4], by_sm, 4)


def test_check_errors_reports_and_clears_a_device_flag() -> None:
    planner = _planner()
    planner.count_workload(torch.zeros(4, dtype=torch.int64), 1)
    planner.check_errors()  # nothing flagged
    planner._error_flag(torch.device("cpu")).fill_(1)  # what a GPU kernel does on a bad index
    with pytest.raises(ValueError, match=r"\[-1, 64\)"):
        planner.check_errors()
    planner.check_errors()  # cleared
