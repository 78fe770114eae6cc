"""Planner.run's eager fast path on CUDA (lplb/fast_path.py, csrc/lplb/cuda_run.cpp).

The oracle is the custom-op path of the same Planner (`Planner._run_ops`), which these tests
prove the fast path bitwise equal to, or the three custom ops called directly (exchange). Every
fast-path call runs with `_run_ops` replaced by a function that fails, so a silent fallback to
the custom ops cannot make a test pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, torus_2d
from lplb.fast_path import default_backend

pytestmark = pytest.mark.gpu

N_LOGICAL = 256
CUDA = torch.device("cuda")
# (topology, ep_size, redundant slots per rank)
CONFIGS = {
    "cube_ep32_k2": (CUBE_8P2E, 32, 2),
    "cube_ep64_k4": (CUBE_8P2E, 64, 4),
    "hypercube_ep16_k2": (HYPERCUBE_16P2E, 16, 2),
    "ring_ep32_k1": (RING_8P, 32, 1),
    "torus84_ep32_k2": (torus_2d(8, 4), 32, 2),
}
SHAPES = [(4096, 8), (1,), (3, 5, 7), (0, 8)]


def _planner(config: str = "cube_ep32_k2", history_seed: int | None = None) -> Planner:
    r2o, ep, k = CONFIGS[config]
    planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
    if history_seed is not None:
        gen = torch.Generator().manual_seed(history_seed)
        planner.update_redundancy_mapping(torch.rand(N_LOGICAL, generator=gen) ** 4 * 1000)
    return planner


def _idx(seed: int, shape: tuple[int, ...] = (4096, 8), dtype=torch.int64) -> torch.Tensor:
    """Skewed random expert ids on the GPU, about 2 % dropped (-1)."""
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    weights = torch.softmax(torch.randn(N_LOGICAL, device=CUDA, generator=gen) * 2, dim=0)
    flat = torch.multinomial(weights, n, replacement=True, generator=gen)
    flat[torch.rand(n, device=CUDA, generator=gen) < 0.02] = -1
    return flat.view(shape).to(dtype)


def _counter(dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=CUDA)


@contextlib.contextmanager
def _fast_only(planner: Planner) -> Iterator[None]:
    """Fail any call that falls back to the custom ops."""

    def fallback(*args: object) -> None:
        raise AssertionError("Planner.run fell back to the custom ops")

    planner._run_ops = fallback
    try:
        yield
    finally:
        del planner._run_ops


def _warm(planner: Planner, idx: torch.Tensor, n_sms: int | None = None) -> None:
    """First call of a key: custom ops, then the plan is built."""
    before = len(planner._fast)
    planner.run(idx, _counter(), n_sms)
    assert len(planner._fast) == before + 1


def test_the_extension_has_the_fast_path() -> None:
    assert default_backend() is not None, "rebuild lplb._C: it lacks RunPlan"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fast_path_equals_custom_ops(config: str, dtype: torch.dtype, shape: tuple) -> None:
    planner = _planner(config, history_seed=1)
    idx = _idx(2, shape, dtype)
    ops_counter, fast_counter = _counter(), _counter()
    expected = planner._run_ops(idx, ops_counter, None)
    _warm(planner, idx)
    with _fast_only(planner):
        got = planner.run(idx, fast_counter)
    assert got.dtype == dtype and got.shape == idx.shape and got.is_contiguous()
    assert torch.equal(got, expected)
    assert int(fast_counter) == int(ops_counter) >= 1


@pytest.mark.parametrize("n_sms", [1, 37, 132, 1000])
def test_fast_path_equals_custom_ops_for_large_idx_and_any_n_sms(n_sms: int) -> None:
    planner = _planner(history_seed=2)
    idx = _idx(3, (131072, 8))
    expected = planner._run_ops(idx, _counter(), n_sms)
    _warm(planner, idx, n_sms)
    with _fast_only(planner):
        for _ in range(3):  # buffers reused across calls
            assert torch.equal(planner.run(idx, _counter(), n_sms), expected)


def test_fast_path_follows_update_redundancy_mapping() -> None:
    planner = _planner()
    idx = _idx(4)
    _warm(planner, idx)
    with _fast_only(planner):
        before = planner.run(idx, _counter())
    history = torch.rand(N_LOGICAL, generator=torch.Generator().manual_seed(5)) * 1e3
    planner.update_redundancy_mapping(history)
    assert len(planner._fast) == 0
    expected = planner._run_ops(idx, _counter(), None)
    _warm(planner, idx)
    with _fast_only(planner):
        got = planner.run(idx, _counter())
    assert torch.equal(got, expected) and not torch.equal(got, before)


def test_out_of_range_entries_set_the_error_flag_as_the_ops_do() -> None:
    fast, ops = _planner(), _planner()
    good = _idx(6)
    _warm(fast, good)
    with _fast_only(fast):
        fast.run(good, _counter())
    fast.check_errors()  # a clean batch leaves the flag clear
    bad = good.clone()
    bad[0, 0], bad[5, 3], bad[9, 7] = N_LOGICAL, -7, 2**40
    with _fast_only(fast):
        got = fast.run(bad, _counter())
    expected = ops._run_ops(bad, _counter(), None)
    assert torch.equal(got, expected)
    assert int(got[0, 0]) == int(got[5, 3]) == int(got[9, 7]) == -1
    for planner in (fast, ops):
        with pytest.raises(ValueError, match="outside"):
            planner.check_errors()
        planner.check_errors()  # read and cleared


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_avail_counter_counts_every_fast_call(dtype: torch.dtype) -> None:
    planner = _planner(history_seed=7)
    idx = _idx(8)
    _warm(planner, idx)
    per_call = _counter(dtype)
    planner._run_ops(idx, per_call, None)
    storage = torch.zeros(4, dtype=dtype, device=CUDA)
    counter = storage[2:3]  # an offset view: the launcher must use its data_ptr
    with _fast_only(planner):
        for _ in range(5):
            planner.run(idx, counter)
    assert int(per_call) >= 1
    assert storage.tolist() == [0, 0, 5 * int(per_call), 0]


def test_cuda_graph_capture_takes_the_custom_ops_and_replays() -> None:
    planner = _planner(history_seed=9)
    stream = torch.cuda.Stream()
    static_idx = _idx(10)
    counter = _counter()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _warm(planner, static_idx)  # a plan for the capture stream itself
    torch.cuda.current_stream().wait_stream(stream)
    (plan,) = planner._fast._plans.values()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = planner.run(static_idx, counter)
    assert len(planner._fast) == 1  # nothing learnt while capturing
    counter.zero_()
    other = _idx(11)
    with torch.cuda.stream(stream), _fast_only(planner):
        planner.run(other, _counter())  # the plan's probs now hold `other`'s shares
    torch.cuda.current_stream().wait_stream(stream)
    probs_of_other = plan.probs.clone()
    _warm(planner, other)  # the current stream's plan
    ops_counter = _counter()
    for seed in (12, 13, 14):
        fresh = _idx(seed)
        static_idx.copy_(fresh)
        graph.replay()
        with _fast_only(planner):
            eager = planner.run(fresh, _counter())
        assert torch.equal(static_out, eager)
        assert torch.equal(static_out, planner._run_ops(fresh, ops_counter, None))
    assert int(counter) == int(ops_counter) >= 3
    assert torch.equal(plan.probs, probs_of_other)  # the graph did not write the plan's buffers


def test_torch_compile_fullgraph_equals_fast_path() -> None:
    planner = _planner(history_seed=15)
    compiled = torch.compile(planner.run, fullgraph=True)
    counter = _counter()
    idxs = [_idx(16), _idx(17)]
    outs = [compiled(idx, counter, 132) for idx in idxs]
    assert len(planner._fast) == 0  # compiled calls take the custom ops and build no plan
    _warm(planner, idxs[0], 132)
    per_call = _counter()
    with _fast_only(planner):
        for idx, out in zip(idxs, outs, strict=True):
            assert torch.equal(out, planner.run(idx, per_call, 132))
    assert int(counter) == int(per_call) >= 1


def test_fast_path_has_no_host_synchronisation() -> None:
    planner = _planner()
    idx = _idx(18)
    counter = _counter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [planner.run(idx, counter) for _ in range(3)]  # plan built on the first call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = planner._run_ops(idx, _counter(), None)
    assert all(torch.equal(out, expected) for out in outs)
    assert int(counter) == 3 * planner.n_group


def test_streams_get_their_own_plans_and_may_overlap() -> None:
    planner = _planner(history_seed=19)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    idxs = [_idx(20), _idx(21, (8192, 8))]
    expected = [planner._run_ops(i, _counter(), None) for i in idxs]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs: list[list[torch.Tensor]] = [[], []]
    for s, i in zip(streams, idxs, strict=True):
        with torch.cuda.stream(s):
            _warm(planner, i)
    with _fast_only(planner):
        for _ in range(4):  # enqueued back to back on both streams, no synchronisation
            for k, (s, i) in enumerate(zip(streams, idxs, strict=True)):
                with torch.cuda.stream(s):
                    outs[k].append(planner.run(i, _counter()))
    torch.cuda.synchronize()
    buffers = {p.workload.data_ptr() for p in planner._fast._plans.values()}
    assert len(buffers) == 2
    for k in range(2):
        assert all(torch.equal(out, expected[k]) for out in outs[k])


@pytest.mark.parametrize("result_dtype", [torch.int32, torch.int64, torch.float32])
def test_exchange_is_called_between_count_and_solve(result_dtype: torch.dtype) -> None:
    planner = _planner(history_seed=22)
    idx = _idx(23)
    _warm(planner, idx)
    seen: list[torch.Tensor] = []

    def exchange(workload: torch.Tensor) -> torch.Tensor:
        seen.append(workload.clone())
        return (workload * 3 + 1).to(result_dtype)

    planner._exchange = exchange
    with _fast_only(planner):
        got = planner.run(idx, _counter())
    maps = planner._device_maps(idx.device)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    n_sms = planner._default_n_sms(idx.device)
    workload, by_sm = torch.ops.lplb.count_idx(idx, flag, N_LOGICAL, n_sms)
    layout = [planner.n_local_logical, planner.n_local_routed, planner.n_combined]
    probs = torch.ops.lplb.solve(
        (workload * 3 + 1).to(result_dtype), maps.phy2log, maps.r2o, maps.o2r, _counter(), layout
    )
    expected = torch.ops.lplb.map_idx(idx, probs, by_sm, maps.log2phy, maps.prob_index, flag)
    assert torch.equal(seen[-1], workload)
    assert torch.equal(got, expected)


def test_non_contiguous_idx_takes_the_custom_ops() -> None:
    planner = _planner()
    idx = _idx(24, (8, 4096)).t()
    _warm(planner, _idx(24))
    assert torch.equal(planner.run(idx, _counter()), planner._run_ops(idx, _counter(), None))
