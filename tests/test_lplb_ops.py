"""The torch.library custom ops: schemas, fake implementations, and tracing of Planner.run."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lplb import CUBE_8P2E, Planner
from lplb.oracle import random_workloads

N_LOGICAL = 64


def _planner() -> Planner:
    return Planner(CUBE_8P2E, N_LOGICAL + 4 * 16, N_LOGICAL, ep_size=16)


def _idx(dtype: torch.dtype = torch.int64) -> torch.Tensor:
    rng = np.random.default_rng(5)
    popularity = random_workloads(rng, 3, N_LOGICAL)[2, 0] + 1.0
    values = rng.choice(N_LOGICAL, size=(512, 4), p=popularity / popularity.sum())
    values[0, :2] = -1
    return torch.from_numpy(values).to(dtype)


def _op_args(planner: Planner, idx: torch.Tensor, n_sms: int = 4) -> dict[str, tuple]:
    maps = planner._device_maps(idx.device)
    workload, by_sm = planner.count_workload(idx, n_sms)
    probs, _ = planner.solve_probs(workload, torch.zeros(1, dtype=torch.int64))
    return {
        "count_idx": (idx, torch.zeros(1, dtype=torch.int32), N_LOGICAL, n_sms),
        "solve": (
            workload,
            maps.phy2log,
            maps.r2o,
            maps.o2r,
            torch.zeros(1, dtype=torch.int32),
            [planner.n_local_logical, planner.n_local_routed, planner.n_combined],
        ),
        "map_idx": (
            idx,
            probs,
            by_sm,
            maps.log2phy,
            maps.prob_index,
            torch.zeros(1, dtype=torch.int32),
        ),
    }


def test_schemas_are_the_backend_contract() -> None:
    assert str(torch.ops.lplb.count_idx.default._schema) == (
        "lplb::count_idx(Tensor idx, Tensor(a!) error_flag, int n_logical, int n_sms) "
        "-> (Tensor, Tensor)"
    )
    assert str(torch.ops.lplb.solve.default._schema) == (
        "lplb::solve(Tensor workload, Tensor phy2log, Tensor r2o, Tensor o2r, "
        "Tensor(a!) avail_counter, int[] layout) -> Tensor"
    )
    assert str(torch.ops.lplb.map_idx.default._schema) == (
        "lplb::map_idx(Tensor idx, Tensor probs, Tensor workload_by_sm, Tensor log2phy, "
        "Tensor prob_index, Tensor(a!) error_flag) -> Tensor"
    )


@pytest.mark.parametrize("name", ["count_idx", "solve", "map_idx"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_opcheck(name: str, dtype: torch.dtype) -> None:
    args = _op_args(_planner(), _idx(dtype))[name]
    torch.library.opcheck(getattr(torch.ops.lplb, name).default, args)


def test_fake_implementations_give_output_metadata() -> None:
    planner = _planner()
    real = _op_args(planner, _idx(torch.int32), n_sms=6)
    expected = {
        "count_idx": torch.ops.lplb.count_idx(*real["count_idx"]),
        "solve": (torch.ops.lplb.solve(*real["solve"]),),
        "map_idx": (torch.ops.lplb.map_idx(*real["map_idx"]),),
    }
    with FakeTensorMode() as mode:
        for name, args in real.items():
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = getattr(torch.ops.lplb, name)(*fake_args)
            out = out if isinstance(out, tuple) else (out,)
            assert [(o.shape, o.dtype) for o in out] == [(e.shape, e.dtype) for e in expected[name]]


def test_run_compiles_with_fullgraph_and_matches_eager() -> None:
    planner = _planner()
    idx = _idx()
    eager_counter = torch.zeros(1, dtype=torch.int64)
    compiled_counter = torch.zeros(1, dtype=torch.int64)
    eager = planner.run(idx, eager_counter)
    compiled = torch.compile(planner.run, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        out = compiled(idx, compiled_counter)
        assert torch.equal(out, eager)
    assert int(compiled_counter) == 2 * int(eager_counter) == 2 * planner.n_group


@pytest.mark.parametrize("name", ["count_idx", "solve", "map_idx"])
def test_meta_tensors_raise_outside_tracing(name: str) -> None:
    """A real meta tensor would reach the fake kernel and return uninitialised memory."""
    args = _op_args(_planner(), _idx())[name]
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError, match="meta"):
        getattr(torch.ops.lplb, name)(*meta)


@pytest.mark.parametrize("name", ["count_idx", "solve", "map_idx"])
def test_mixed_devices_raise(name: str) -> None:
    args = list(_op_args(_planner(), _idx())[name])
    args[1] = args[1].to("meta")  # the second tensor on another device than the first
    with pytest.raises(ValueError, match="is on meta"):
        getattr(torch.ops.lplb, name)(*args)


def test_map_idx_raises_for_indices_outside_range_on_cpu() -> None:
    """-2 must not be dropped silently: count_idx and map_idx both raise on the CPU."""
    planner = _planner()
    idx = _idx()
    args = list(_op_args(planner, idx)["map_idx"])
    bad = idx.clone()
    bad[3, 1] = -2
    args[0] = bad
    with pytest.raises(ValueError, match="-2"):
        torch.ops.lplb.map_idx(*args)
    bad[3, 1] = N_LOGICAL
    with pytest.raises(ValueError, match=str(N_LOGICAL)):
        planner.weighted_select_target(bad, args[1], args[2], 4)
