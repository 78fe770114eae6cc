"""The plan cache of Planner.run's eager fast path (lplb/fast_path.py), on the CPU.

The CUDA launcher is replaced by a CPU double with the same constructor keywords and methods,
which reads and writes the raw addresses it is given (ctypes) and computes with the CPU
reference kernels. So these tests check what the fast path does around the launcher: which
call builds a plan, which key it is stored under, when it is dropped, the addresses and sizes
it is built with, the order count -> exchange -> solve -> map, and every fallback to the custom
ops. The oracle is the custom-op path (`Planner._run_ops`) or the reference functions directly.
tests/test_gpu_fast_path.py runs the real launcher against the custom ops on a GPU.
"""

from __future__ import annotations

import copy
import ctypes
import math
import pickle
import re
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lplb.fast_path
from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, Planner, reference, torus_2d
from lplb.fast_path import MAX_PLANS, FastPath

N_LOGICAL = 64
_CTYPES = {
    torch.int32: ctypes.c_int32,
    torch.int64: ctypes.c_int64,
    torch.float32: ctypes.c_float,
    torch.float64: ctypes.c_double,
}
_CODES = {"int32": 0, "int64": 1, "float32": 2, "float64": 3}
_CODE_DTYPES = {0: torch.int32, 1: torch.int64, 2: torch.float32, 3: torch.float64}


def _view(address: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor sharing the CPU memory at ``address`` (what the CUDA launcher dereferences)."""
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer((_CTYPES[dtype] * n).from_address(address), dtype=dtype).view(shape)


class _FakeRunPlan:
    """CPU double of lplb._C.RunPlan (csrc/lplb/cuda_run.cpp): same keywords and methods."""

    def __init__(
        self,
        *,
        device: int,
        n_logical: int,
        n_sms: int,
        workload: int,
        workload_by_sm: int,
        error_flag: int,
        probs: int,
        n_probs: int,
        phy2log: int,
        n_physical: int,
        r2o: int,
        o2r: int,
        group_size: int,
        n_sets: int,
        n_group: int,
        n_local_logical: int,
        n_local_routed: int,
        n_combined: int,
        log2phy: int,
        prob_index: int,
        _backend: _FakeBackend,
    ) -> None:
        assert n_probs == n_group * group_size * n_sets
        self.backend = _backend
        self.device = device
        self.n_logical, self.n_sms = n_logical, n_sms
        self.workload = _view(workload, torch.int32, (n_logical,))
        self.workload_by_sm = _view(workload_by_sm, torch.int32, (n_sms, n_logical))
        self.error_flag = _view(error_flag, torch.int32, (1,))
        self.probs = _view(probs, torch.float32, (n_group, group_size, n_sets))
        self.phy2log = _view(phy2log, torch.int32, (n_physical,))
        self.r2o = _view(r2o, torch.int32, (group_size, n_sets))
        self.o2r = _view(o2r, torch.int32, (group_size, n_sets))
        self.layout = (n_local_logical, n_local_routed, n_combined)
        self.log2phy = _view(log2phy, torch.int32, (n_logical, 2))
        self.prob_index = _view(prob_index, torch.int32, (n_logical,))

    def _idx(self, idx: int, idx_int64: bool, n: int) -> torch.Tensor:
        return _view(idx, torch.int64 if idx_int64 else torch.int32, (n,))

    def run(self, idx, idx_int64, n, out, avail_counter, avail_int64, stream) -> bool:
        if self.backend.capturing:
            return False
        self.backend.log.append("run")
        self.backend.streams.append(stream)
        self._count(idx, idx_int64, n)
        self._solve_map(self.workload, idx, idx_int64, n, out, avail_counter, avail_int64)
        return True

    def count(self, idx, idx_int64, n, stream) -> bool:
        if self.backend.capturing:
            return False
        self.backend.log.append("count")
        self.backend.streams.append(stream)
        self._count(idx, idx_int64, n)
        return True

    def solve_map(
        self, workload, workload_type, idx, idx_int64, n, out, avail_counter, avail_int64, stream
    ) -> None:
        self.backend.log.append("solve_map")
        self.backend.streams.append(stream)
        total = _view(workload, _CODE_DTYPES[workload_type], (self.n_logical,))
        self._solve_map(total, idx, idx_int64, n, out, avail_counter, avail_int64)

    def _count(self, idx: int, idx_int64: bool, n: int) -> None:
        flat = self._idx(idx, idx_int64, n)
        bad = (flat < -1) | (flat >= self.n_logical)
        if bool(bad.any()):
            self.error_flag.fill_(1)  # the GPU contract: flag, drop, never raise
        workload, by_sm = reference.count_idx(flat.masked_fill(bad, -1), self.n_logical, self.n_sms)
        self.workload.copy_(workload)
        self.workload_by_sm.copy_(by_sm)

    def _solve_map(self, total, idx, idx_int64, n, out, avail_counter, avail_int64) -> None:
        counter = _view(avail_counter, torch.int64 if avail_int64 else torch.int32, (1,))
        probs = reference.solve(total, self.phy2log, self.r2o, self.o2r, counter, *self.layout)
        self.probs.copy_(probs)
        flat = self._idx(idx, idx_int64, n)
        bad = (flat < -1) | (flat >= self.n_logical)
        mapped = reference.map_idx(
            flat.masked_fill(bad, -1),
            self.probs,
            self.workload_by_sm,
            self.log2phy,
            self.prob_index,
        )
        _view(out, flat.dtype, (n,)).copy_(mapped)


class _FakeBackend:
    """Stands in for lplb._C: RunPlan, workload_types, and a log of launches."""

    workload_types = _CODES

    def __init__(self) -> None:
        self.capturing = False
        self.log: list[str] = []
        self.streams: list[int] = []
        self.plans: list[_FakeRunPlan] = []

    def RunPlan(self, **kwargs: int) -> _FakeRunPlan:
        plan = _FakeRunPlan(**kwargs, _backend=self)
        self.plans.append(plan)
        return plan


class _Streams:
    """The 'current stream' of the fake: a settable handle."""

    def __init__(self) -> None:
        self.current = 7

    def __call__(self, device: int) -> int:
        assert device == -1  # CPU tensors report device -1
        return self.current


def _planner(r2o: torch.Tensor = CUBE_8P2E, ep: int = 16, k: int = 2) -> Planner:
    return Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)


def _attach(planner: Planner) -> tuple[_FakeBackend, _Streams]:
    backend, streams = _FakeBackend(), _Streams()
    planner._fast = FastPath(backend, stream_of=streams, device_type="cpu")
    return backend, streams


def _idx(seed: int, shape: tuple[int, ...] = (512, 4), dtype=torch.int64) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(N_LOGICAL, generator=gen) ** 3 + 0.01
    flat = torch.multinomial(weights, math.prod(shape), replacement=True, generator=gen)
    flat[torch.rand(flat.shape, generator=gen) < 0.05] = -1
    return flat.view(shape).to(dtype)


def _oracle(planner: Planner, idx: torch.Tensor, n_sms: int, exchange=None) -> tuple:
    """Reference count -> (exchange) -> solve -> map on the planner's maps; (out, converged)."""
    maps = planner._device_maps(idx.device)
    workload, by_sm = reference.count_idx(idx, N_LOGICAL, n_sms)
    if exchange is not None:
        workload = exchange(workload.clone())
    counter = torch.zeros(1, dtype=torch.int64)
    layout = (planner.n_local_logical, planner.n_local_routed, planner.n_combined)
    probs = reference.solve(workload, maps.phy2log, maps.r2o, maps.o2r, counter, *layout)
    return reference.map_idx(idx, probs, by_sm, maps.log2phy, maps.prob_index), int(counter)


CONFIGS = [(CUBE_8P2E, 16, 2), (HYPERCUBE_16P2E, 16, 2), (RING_8P, 8, 1), (torus_2d(4, 2), 8, 4)]


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(512, 4), (100,), (3, 5, 7), (0, 4)])
def test_second_call_uses_the_plan_and_matches_the_ops(
    config: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    planner = _planner(*CONFIGS[config])
    backend, _ = _attach(planner)
    idx = _idx(config, shape, dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    first = planner.run(idx, counter, 3)  # custom ops, then the plan is built
    assert backend.log == [] and len(planner._fast) == 1
    second = planner.run(idx, counter, 3)
    assert backend.log == ["run"]
    expected, converged = _oracle(planner, idx, 3)
    for out in (first, second):
        assert out.dtype == dtype and out.shape == idx.shape and out.is_contiguous()
        assert torch.equal(out, expected)
    assert int(counter) == 2 * converged == 2 * planner.n_group


def test_plan_is_built_with_the_planner_sizes_and_buffers() -> None:
    planner = _planner(torus_2d(4, 2), 8, 4)
    backend, _ = _attach(planner)
    idx = _idx(1)
    planner.run(idx, torch.zeros(1, dtype=torch.int64))
    (plan,) = backend.plans
    maps = planner._device_maps(idx.device)
    assert plan.n_sms == 8 and plan.n_logical == N_LOGICAL  # CPU default n_sms
    assert plan.layout == (planner.n_local_logical, planner.n_local_routed, planner.n_combined)
    assert plan.probs.shape == (planner.n_group, planner.group_size, planner.n_sets)
    for name in ("phy2log", "r2o", "o2r", "log2phy", "prob_index"):
        assert torch.equal(getattr(plan, name), getattr(maps, name)), name
    assert plan.error_flag.data_ptr() == planner._error_flag(idx.device).data_ptr()


def test_plans_are_keyed_by_dtype_n_sms_and_stream() -> None:
    planner = _planner()
    backend, streams = _attach(planner)
    counter = torch.zeros(1, dtype=torch.int64)
    calls = [(torch.int64, 4, 7), (torch.int32, 4, 7), (torch.int64, 5, 7), (torch.int64, 4, 9)]
    for dtype, n_sms, stream in calls:
        streams.current = stream
        idx = _idx(2, dtype=dtype)
        for _ in range(2):
            assert torch.equal(planner.run(idx, counter, n_sms), _oracle(planner, idx, n_sms)[0])
    assert len(planner._fast) == 4
    assert backend.log == ["run"] * 4
    assert backend.streams == [7, 7, 7, 9]
    assert {(p.n_sms, p.workload.data_ptr()) for p in backend.plans}.__len__() == 4


def test_update_redundancy_mapping_drops_the_plans() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx = _idx(3)
    counter = torch.zeros(1, dtype=torch.int64)
    before = [planner.run(idx, counter, 4) for _ in range(2)][1]
    gen = torch.Generator().manual_seed(3)
    planner.update_redundancy_mapping(torch.rand(N_LOGICAL, generator=gen) * 1000)
    assert len(planner._fast) == 0
    after = [planner.run(idx, counter, 4) for _ in range(2)]
    expected = _oracle(planner, idx, 4)[0]
    assert not torch.equal(before, expected)  # a stale plan would give the old layout's answer
    assert all(torch.equal(out, expected) for out in after)
    assert backend.log == ["run", "run"] and len(backend.plans) == 2


@pytest.mark.parametrize(
    "case", ["non_contiguous", "counter_int16", "counter_two", "n_sms_bool", "n_sms_numpy"]
)
def test_unusual_calls_take_the_custom_ops(case: str) -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx = _idx(4)
    counter = torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)  # builds the plan of (int64, n_sms=4)
    if case == "non_contiguous":
        strided = _idx(5, (4, 512)).t()
        assert torch.equal(planner.run(strided, counter, 4), _oracle(planner, strided, 4)[0])
    elif case == "counter_int16":
        with pytest.raises(TypeError, match="avail_counter"):
            planner.run(idx, torch.zeros(1, dtype=torch.int16), 4)
    elif case == "counter_two":
        with pytest.raises(ValueError, match="avail_counter"):
            planner.run(idx, torch.zeros(2, dtype=torch.int64), 4)
    elif case == "n_sms_bool":
        with pytest.raises(TypeError, match="n_sms"):
            planner.run(idx, counter, True)
    else:
        assert torch.equal(planner.run(idx, counter, np.int64(4)), _oracle(planner, idx, 4)[0])
    assert backend.log == []


def test_rejected_first_call_builds_no_plan() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    bad = _idx(6)
    bad[0, 0] = N_LOGICAL
    with pytest.raises(ValueError, match="outside"):
        planner.run(bad, torch.zeros(1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="n_sms"):
        planner.run(_idx(6), torch.zeros(1, dtype=torch.int64), 0)
    assert len(planner._fast) == 0 and backend.plans == []


def test_out_of_range_entry_sets_the_flag_through_the_plan() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    counter = torch.zeros(1, dtype=torch.int64)
    good = _idx(7)
    planner.run(good, counter, 4)
    bad = good.clone()
    bad[3, 1] = N_LOGICAL + 2
    out = planner.run(bad, counter, 4)  # the plan follows the device contract: flag, map to -1
    assert backend.log == ["run"] and out[3, 1] == -1
    with pytest.raises(ValueError, match="outside"):
        planner.check_errors()
    planner.check_errors()  # cleared


def test_capture_takes_the_custom_ops() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx, counter = _idx(8), torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)
    backend.capturing = True
    assert torch.equal(planner.run(idx, counter, 4), _oracle(planner, idx, 4)[0])
    assert backend.log == [] and int(counter) == 2 * planner.n_group


def test_dispatch_modes_and_compile_take_the_custom_ops() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx, counter = _idx(9), torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)

    lplb_ops: list[str] = []

    class LplbOps(TorchDispatchMode):
        """Records the lplb custom ops that reach the dispatcher."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "lplb":
                lplb_ops.append(func.name())
            return func(*args, **(kwargs or {}))

    with LplbOps():
        planner.run(idx, counter, 4)
    assert lplb_ops == ["lplb::count_idx", "lplb::solve", "lplb::map_idx"]
    compiled = torch.compile(planner.run, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(idx, counter, 4), _oracle(planner, idx, 4)[0])
    assert backend.log == []


def test_exchange_runs_between_count_and_solve() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx, counter = _idx(10), torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)
    seen: list[torch.Tensor] = []

    def exchange(workload: torch.Tensor) -> torch.Tensor:
        backend.log.append("exchange")
        seen.append(workload.clone())
        return workload.to(torch.float64) * 3 + torch.arange(N_LOGICAL)

    planner._exchange = exchange
    out = planner.run(idx, counter, 4)
    assert backend.log == ["count", "exchange", "solve_map"]
    assert torch.equal(seen[0], reference.count_idx(idx, N_LOGICAL, 4)[0])
    expected, _ = _oracle(
        planner, idx, 4, lambda w: w.to(torch.float64) * 3 + torch.arange(N_LOGICAL)
    )
    assert torch.equal(out, expected)


class _AddressExchange:
    """An exchange with ``sum_into`` (like NvshmemExchange): out = 2 * workload + e, on raw
    addresses; ``__call__`` must not be used by the fast path."""

    def __init__(self, log: list[str], device: torch.device) -> None:
        self.log = log
        self.device = device

    def __call__(self, workload: torch.Tensor) -> torch.Tensor:
        self.log.append("call")
        return workload * 2 + torch.arange(N_LOGICAL, dtype=torch.int32)

    def sum_into(self, workload: int, out: int, stream: int) -> None:
        self.log.append("sum_into")
        source = _view(workload, torch.int32, (N_LOGICAL,))
        _view(out, torch.int32, (N_LOGICAL,)).copy_(source * 2 + torch.arange(N_LOGICAL))


def test_exchange_with_sum_into_skips_the_call() -> None:
    planner = _planner()
    backend, _ = _attach(planner)
    idx, counter = _idx(12), torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)
    planner._exchange = _AddressExchange(backend.log, torch.device("cpu"))
    first = planner.run(idx, counter, 4)
    second = planner.run(idx, counter, 4)
    assert backend.log == ["count", "sum_into", "solve_map"] * 2
    expected, _ = _oracle(planner, idx, 4, lambda w: w * 2 + torch.arange(N_LOGICAL))
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    # On another device than the workload's, the exchange is called as a function instead.
    backend.log.clear()
    planner._exchange = _AddressExchange(backend.log, torch.device("meta"))
    assert torch.equal(planner.run(idx, counter, 4), expected)
    assert backend.log == ["count", "call", "solve_map"]


@pytest.mark.parametrize(
    "result, error",
    [
        ([1.0] * N_LOGICAL, TypeError),
        (torch.zeros(N_LOGICAL, dtype=torch.int16), TypeError),
        (torch.zeros(N_LOGICAL + 1, dtype=torch.int32), ValueError),
        (torch.zeros(2 * N_LOGICAL, dtype=torch.int32)[::2], ValueError),
    ],
)
def test_bad_exchange_result_raises(result: object, error: type[Exception]) -> None:
    planner = _planner()
    _attach(planner)
    idx, counter = _idx(11), torch.zeros(1, dtype=torch.int64)
    planner.run(idx, counter, 4)
    planner._exchange = lambda workload: result
    with pytest.raises(error, match="exchange"):
        planner.run(idx, counter, 4)


def test_cache_is_bounded_and_copies_start_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_PLANS == 64
    monkeypatch.setattr(lplb.fast_path, "MAX_PLANS", 3)
    planner = _planner()
    _, streams = _attach(planner)
    idx, counter = _idx(13, (16, 2)), torch.zeros(1, dtype=torch.int64)
    sizes = []
    for stream in range(7):
        streams.current = stream
        planner.run(idx, counter, 4)
        sizes.append(len(planner._fast))
    assert sizes == [1, 2, 3, 1, 2, 3, 1]
    twin = copy.deepcopy(planner)
    assert len(twin._fast) == 0
    assert torch.equal(twin.run(idx, counter, 4), _oracle(planner, idx, 4)[0])


def test_default_planner_copies_and_pickles() -> None:
    planner = _planner()
    module = types.ModuleType("fake_extension")
    module.RunPlan, module.workload_types = _FakeBackend().RunPlan, _CODES
    planner._fast = FastPath(module)  # a module backend, like lplb._C
    idx = _idx(15)
    for twin in (copy.deepcopy(planner), pickle.loads(pickle.dumps(planner))):
        assert twin._fast._backend is lplb.fast_path.default_backend()
        assert torch.equal(
            twin.run(idx, torch.zeros(1, dtype=torch.int64), 4), _oracle(twin, idx, 4)[0]
        )


def test_default_planner_keeps_cpu_calls_on_the_custom_ops() -> None:
    planner = _planner()
    idx = _idx(14)
    out = planner.run(idx, torch.zeros(1, dtype=torch.int64), 4)
    assert torch.equal(out, _oracle(planner, idx, 4)[0])
    assert len(planner._fast) == 0


def test_fast_path_rejects_unknown_device_type() -> None:
    with pytest.raises(ValueError, match="device_type"):
        FastPath(None, device_type="meta")


def _pybind_arguments(doc: str, name: str) -> list[str]:
    """Argument names of method ``name`` in a pybind11 docstring signature."""
    match = re.search(rf"{name}\(self: [\w.]+,? ?(.*?)\)", doc)
    assert match, doc
    return [a.split(":")[0].strip() for a in match.group(1).split(",") if a.strip() != "*"]


def test_double_matches_the_extension_signatures() -> None:
    from lplb import _C

    if not hasattr(_C, "RunPlan"):
        pytest.skip("this lplb._C was built before RunPlan (rebuild the extension)")
    import inspect

    fake_init = [p for p in inspect.signature(_FakeRunPlan).parameters if p != "_backend"]
    assert _pybind_arguments(_C.RunPlan.__init__.__doc__, "__init__") == fake_init
    for method in ("run", "count", "solve_map"):
        fake = list(inspect.signature(getattr(_FakeRunPlan, method)).parameters)[1:]
        assert _pybind_arguments(getattr(_C.RunPlan, method).__doc__, method) == fake, method
    assert dict(_C.workload_types) == _CODES
