"""Property tests over every public lplb entry: valid inputs give valid outputs, invalid inputs
give ValueError/TypeError (never another exception, a crash or a hang)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lplb import CUBE_8P2E, RING_8P, Planner, ring, torus_2d, validate_r2o

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
BUDGET_S = 10.0  # no single call may take longer: a hang shows up as a failure, not a stall

# Values that are wrong for any argument of a given kind.
JUNK = st.sampled_from(
    [None, "3", 2.5, True, [1, 2], object(), float("nan"), -1, 0, 10**9, torch.tensor([1.0])]
)


def _call(fn, *args, **kwargs):
    """Run fn; return its result, or the ValueError/TypeError it raised. Anything else fails."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as error:
        return error
    finally:
        assert time.perf_counter() - start < BUDGET_S


def _topologies() -> st.SearchStrategy[torch.Tensor]:
    return st.one_of(
        st.just(CUBE_8P2E),
        st.just(RING_8P),
        st.integers(2, 6).map(ring),
        st.tuples(st.integers(2, 3), st.integers(2, 3)).map(lambda mn: torus_2d(*mn)),
    )


@st.composite
def planners(draw) -> Planner:
    r2o = draw(_topologies())
    group_size, n_sets = r2o.shape
    ep = group_size * draw(st.integers(1, 2))
    n_ll = n_sets * draw(st.integers(1, 3))
    c = draw(st.integers(1, n_ll // n_sets))
    return Planner(r2o, ep * (n_ll + c * n_sets), ep * n_ll, ep_size=ep, num_nodes=1)


@st.composite
def idx_for(draw, planner: Planner) -> torch.Tensor:
    shape = draw(st.sampled_from([(0,), (1,), (7,), (13, 3), (2, 5, 4)]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, planner.n_logical, shape, generator=gen).to(dtype)


@FUZZ
@given(data=st.data())
def test_valid_inputs_give_valid_outputs(data) -> None:
    planner = data.draw(planners())
    if data.draw(st.booleans()):
        history = torch.rand(planner.n_logical, generator=torch.Generator().manual_seed(1)) * 100
        planner.update_redundancy_mapping(history)
    phy2log, log2phy, logcnt = planner.phy2log, planner.log2phy, planner.logcnt
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int32
    assert sorted(set(phy2log.tolist())) == list(range(planner.n_logical))
    idx = data.draw(idx_for(planner))
    n_sms = data.draw(st.integers(1, 40))
    workload, by_sm = planner.count_workload(idx, n_sms)
    assert torch.equal(by_sm[-1], workload)
    counter = torch.zeros(1, dtype=torch.int64)
    probs, global_workload = planner.solve_probs(workload, counter)
    assert probs.shape == (planner.n_group, planner.group_size, planner.n_sets)
    assert bool(((probs >= 0) & (probs <= 1)).all())
    assert global_workload.shape == (planner.n_group, planner.group_size, planner.n_local_logical)
    mapped = planner.weighted_select_target(idx, probs, by_sm, n_sms)
    assert mapped.shape == idx.shape and mapped.dtype == idx.dtype
    flat, out = idx.reshape(-1).long(), mapped.reshape(-1).long()
    assert torch.equal(out < 0, flat < 0)
    ok = flat >= 0
    slots = log2phy.long()[flat[ok]]
    assert bool(((out[ok] == slots[:, 0]) | (out[ok] == slots[:, 1])).all())
    assert torch.equal(planner.run(idx, counter, n_sms), mapped)


@FUZZ
@given(
    r2o=st.one_of(JUNK, st.just(torch.tensor([[0], [1]])), st.just(torch.zeros(3, 1))),
    n_routed=st.one_of(JUNK, st.integers(-5, 200)),
    n_logical=st.one_of(JUNK, st.integers(-5, 200)),
    ep=st.one_of(st.none(), JUNK, st.integers(-3, 40)),
    nodes=st.one_of(st.none(), JUNK, st.integers(-1, 5)),
)
def test_bad_planner_arguments_raise_value_or_type_error(r2o, n_routed, n_logical, ep, nodes):
    result = _call(Planner, r2o, n_routed, n_logical, ep, num_nodes=nodes)
    if isinstance(result, Planner):  # a valid combination: the layout must be consistent
        assert result.phy2log.numel() == result.n_routed


@FUZZ
@given(data=st.data(), junk=JUNK)
def test_bad_call_arguments_raise_value_or_type_error(data, junk) -> None:
    planner = Planner(CUBE_8P2E, 64 + 16, 64, ep_size=8, num_nodes=1)
    idx = torch.randint(-1, 64, (50, 2))
    counter = torch.zeros(1, dtype=torch.int32)
    workload, by_sm = planner.count_workload(idx, 4)
    probs, _ = planner.solve_probs(workload, counter)
    bad_idx = data.draw(
        st.sampled_from(
            [
                junk,
                idx.float(),
                idx.to("meta"),
                torch.full((3,), -2),
                torch.full((3,), 64),
                torch.tensor(2**40),
                idx.tolist(),
            ]
        )
    )
    bad_n_sms = data.draw(st.sampled_from([junk, 0, -1, 10**6, 4.0]))
    bad_counter = data.draw(
        st.sampled_from(
            [junk, counter.float(), torch.zeros(2, dtype=torch.int32), counter.to("meta")]
        )
    )
    bad_probs = data.draw(st.sampled_from([junk, probs.double(), probs[0], probs.to("meta")]))
    bad_workload = data.draw(
        st.sampled_from([junk, workload[:-1], workload.to("meta"), workload.bool(), workload[None]])
    )
    calls = [
        lambda: planner.count_workload(bad_idx, 4),
        lambda: planner.count_workload(idx, bad_n_sms),
        lambda: planner.solve_probs(workload, bad_counter),
        lambda: planner.solve_probs(bad_workload, counter),
        lambda: planner.weighted_select_target(bad_idx, probs, by_sm, 4),
        lambda: planner.weighted_select_target(idx, bad_probs, by_sm, 4),
        lambda: planner.weighted_select_target(idx, probs, by_sm, bad_n_sms),
        lambda: planner.weighted_select_target(idx, probs, junk, 4),
        lambda: planner.run(bad_idx, counter),
        lambda: planner.run(idx, bad_counter),
        lambda: planner.update_redundancy_mapping(bad_workload if bad_workload is not None else 1),
        lambda: planner.update_redundancy_mapping(torch.full((64,), float("nan"))),
        lambda: planner.update_redundancy_mapping(torch.full((64,), -1.0)),
    ]
    for call in calls:
        result = _call(call)
        assert isinstance(result, (ValueError, TypeError)), result


@FUZZ
@given(m=st.one_of(JUNK, st.integers(-3, 6)), n=st.one_of(JUNK, st.integers(-3, 6)))
def test_topology_constructors(m, n) -> None:
    for result in (_call(torus_2d, m, n), _call(ring, m)):
        if isinstance(result, torch.Tensor):
            validate_r2o(result)


@pytest.mark.parametrize(
    "r2o", [torch.tensor([[1], [0]]).to("meta"), torch.tensor([[1], [0]], dtype=torch.bool)]
)
def test_validate_r2o_rejects_meta_and_bool(r2o: torch.Tensor) -> None:
    assert isinstance(_call(validate_r2o, r2o), (ValueError, TypeError))
