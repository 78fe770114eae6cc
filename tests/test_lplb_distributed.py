"""Planner with a process group (gloo, CPU processes, 2 and 4 ranks): workloads are summed over
the EP ranks inside solve_probs and run, eagerly and under torch.compile(fullgraph=True).

Oracle: the per-rank token counts by torch.bincount, summed in a plain loop over the ranks, and
a single-process Planner (no group) that solves and maps with that sum. One spawn per world size
runs every topology; the tests check its records.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from moves_cases import free_port, spawn

from lplb import Planner, comm, ring, torus_2d
from lplb.oracle import random_workloads

N_LOGICAL = 32
N_SMS = 3
CALLS = 3  # run calls per topology, each with other idx
TOPOLOGIES = {2: {"ring(2)": ring(2)}, 4: {"ring(4)": ring(4), "torus_2d(2,2)": torus_2d(2, 2)}}
# Topology traced by torch.compile, per world size (see the compile test).
COMPILED = {2: "ring(2)"}


def _planner(r2o: torch.Tensor, world: int, **kwargs) -> Planner:
    return Planner(r2o, N_LOGICAL + 2 * world, N_LOGICAL, **kwargs)


def _rank_idx(rank: int, call: int) -> torch.Tensor:
    """Each rank routes its own tokens, with its own hot experts and a few dropped (-1) slots."""
    rng = np.random.default_rng(100 + rank + 1000 * call)
    popularity = random_workloads(rng, 3, N_LOGICAL)[call % 3, 0] + 1.0
    size = (300 + 50 * rank + 7 * call, 4)
    idx = rng.choice(N_LOGICAL, size=size, p=popularity / popularity.sum())
    idx[rng.random(idx.shape) < 0.03] = -1
    return torch.from_numpy(idx)


def _summed_counts(world: int, call: int) -> torch.Tensor:
    """[E] int32: the tokens of every rank per expert, counted and summed without lplb."""
    total = torch.zeros(N_LOGICAL, dtype=torch.int64)
    for rank in range(world):
        idx = _rank_idx(rank, call).reshape(-1)
        total += torch.bincount(idx[idx >= 0], minlength=N_LOGICAL)
    return total.to(torch.int32)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        record: dict = {}
        for name, r2o in TOPOLOGIES[world].items():
            planner = _planner(r2o, world, group=dist.group.WORLD)
            rec: dict = {"ep_size": planner.ep_size, "probs": [], "global": [], "run": []}
            rec["counters"] = []
            for call in range(CALLS):
                idx = _rank_idx(rank, call)
                workload, by_sm = planner.count_workload(idx, N_SMS)
                local = workload.clone()
                counter = torch.zeros(1, dtype=torch.int64)
                probs, global_workload = planner.solve_probs(workload, counter)
                rec["local_unchanged"] = torch.equal(local, workload)
                rec["probs"].append(probs)
                rec["global"].append(global_workload)
                rec["counters"].append(int(counter))
                rec["mapped"] = planner.weighted_select_target(idx, probs, by_sm, N_SMS)
                rec["run"].append(planner.run(idx, torch.zeros(1, dtype=torch.int64), N_SMS))
            if COMPILED.get(world) == name:
                compiled = torch.compile(planner.run, fullgraph=True, backend="aot_eager")
                counter = torch.zeros(1, dtype=torch.int32)
                rec["compiled"] = [compiled(_rank_idx(rank, c), counter, N_SMS) for c in range(2)]
                rec["compiled_counter"] = int(counter)
            record[name] = rec
        # Without lplb._nvshmem, init_nvshmem must say what to install, on every rank.
        if not comm.nvshmem_available():
            try:
                _planner(next(iter(TOPOLOGIES[world].values())), world).init_nvshmem(
                    dist.group.WORLD
                )
            except ImportError as err:
                record["nvshmem_error"] = str(err)
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def records(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world = request.param
    out = tmp_path_factory.mktemp(f"lplb_dist{world}")
    spawn(_worker, world, (free_port(), str(out)), timeout=240)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@functools.cache
def _single(world: int, name: str) -> Planner:
    return _planner(TOPOLOGIES[world][name], world, ep_size=world)


@functools.cache
def _expected_probs(world: int, name: str, call: int) -> torch.Tensor:
    """probs of a single-process Planner given the summed counts."""
    counter = torch.zeros(1, dtype=torch.int64)
    probs, _ = _single(world, name).solve_probs(_summed_counts(world, call), counter)
    assert int(counter) == _single(world, name).n_group  # every LP converged
    return probs


def _expected_run(world: int, name: str, rank: int, call: int) -> torch.Tensor:
    """What run must return on ``rank``: the single-process mapping with the oracle's probs."""
    single = _single(world, name)
    idx = _rank_idx(rank, call)
    _, by_sm = single.count_workload(idx, N_SMS)
    return single.weighted_select_target(idx, _expected_probs(world, name, call), by_sm, N_SMS)


def test_probs_bitwise_equal_on_every_rank_and_to_single_process_solve(records: tuple) -> None:
    world, recs = records
    for name in TOPOLOGIES[world]:
        single = _single(world, name)
        for call in range(CALLS):
            expected = _expected_probs(world, name, call)
            summed = _summed_counts(world, call).float()
            for rank in range(world):
                rec = recs[rank][name]
                assert rec["ep_size"] == world
                assert torch.equal(rec["probs"][call], recs[0][name]["probs"][call]), (name, rank)
                assert torch.equal(rec["probs"][call], expected), (name, call, rank)
                # DeepSeek LPLB's second value: the summed workload, float32, viewed by rank.
                view = summed.view(single.n_group, world // single.n_group, N_LOGICAL // world)
                assert torch.equal(rec["global"][call], view)
                assert rec["counters"][call] == single.n_group
                assert rec["local_unchanged"]  # the caller's workload is not summed in place


def test_run_conserves_tokens_and_maps_like_the_single_process_planner(records: tuple) -> None:
    world, recs = records
    for name in TOPOLOGIES[world]:
        phy2log = _single(world, name).phy2log.long()
        for rank in range(world):
            rec = recs[rank][name]
            for call in range(CALLS):
                idx = _rank_idx(rank, call)
                out = rec["run"][call]
                assert out.shape == idx.shape and out.dtype == idx.dtype
                assert torch.equal(out, _expected_run(world, name, rank, call)), (name, rank)
                # Every token lands on a slot of its own expert; dropped slots stay -1.
                kept = idx >= 0
                assert bool((out[kept] >= 0).all())
                assert torch.equal(phy2log[out[kept]], idx[kept])
                assert torch.equal(out[~kept], idx[~kept])
            assert torch.equal(rec["mapped"], rec["run"][-1])


@pytest.mark.parametrize("records", [2], indirect=True, ids=["2ranks"])
def test_run_under_torch_compile_fullgraph_sums_over_the_group(records: tuple) -> None:
    # torch.compile costs ~10 s of CPU per process: traced with 2 ranks only (CI has 2 cores).
    world, recs = records
    name = COMPILED[world]
    for rank in range(world):
        rec = recs[rank][name]
        for call in range(2):
            assert torch.equal(rec["compiled"][call], _expected_run(world, name, rank, call))
        assert rec["compiled_counter"] == 2 * _single(world, name).n_group


def test_init_nvshmem_without_the_nvshmem_build_says_what_to_install(records: tuple) -> None:
    _, recs = records
    if comm.nvshmem_available():
        pytest.skip("lplb._nvshmem is built here; tests/test_gpu_exchange.py covers it")
    for rec in recs:
        assert "nvidia-nvshmem-cu13" in rec["nvshmem_error"]
        assert "LPLB_NVSHMEM=1" in rec["nvshmem_error"]


def test_nvshmem_entry_points_reject_bad_arguments() -> None:
    planner = _planner(ring(2), 2, ep_size=2)
    with pytest.raises(ValueError, match="process group"):
        planner.init_nvshmem()
    with pytest.raises(TypeError, match="ProcessGroup"):
        planner.init_nvshmem(group="world")
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="deep_ep"):
            planner.init_from_deep_ep(object())
    else:
        with pytest.raises(TypeError, match=r"deep_ep\.Buffer"):
            planner.init_from_deep_ep(object())
    assert planner._exchange is None and planner.group is None
    # The protocol is checked before anything collective or NVSHMEM-specific happens.
    with pytest.raises(ValueError, match=r"protocol.*'ll'"):
        comm.NvshmemExchange(None, 4, protocol="ll")


class _FakeNvshmem(types.ModuleType):
    """Stand-in for lplb._nvshmem: records the calls lplb.comm makes to start NVSHMEM."""

    def __init__(self, status: int = 0, pe_offset: int = 0) -> None:
        super().__init__("lplb._nvshmem")
        self.status, self.pe_offset, self.calls = status, pe_offset, []

    def init_status(self) -> int:
        return self.status

    def unique_id(self) -> bytes:
        self.calls.append("unique_id")
        return bytes(range(128))

    def init(self, device: int, uid: bytes, rank: int, world: int) -> tuple[int, int]:
        self.calls.append(("init", device, uid, rank, world))
        return rank + self.pe_offset, world

    def attach(self, device: int) -> tuple[int, int]:
        self.calls.append(("attach", device))
        return 0, 1


@pytest.fixture
def one_rank_group(monkeypatch: pytest.MonkeyPatch):
    """A 1-rank gloo group in this process, a fake CUDA device 3 and no NVSHMEM runtime yet."""
    monkeypatch.setattr(comm, "_runtime", None)
    monkeypatch.setattr(comm, "_current_device", lambda: 3)
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS", raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_nvshmem_start_broadcasts_a_unique_id_and_starts_once(
    one_rank_group, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeNvshmem()
    monkeypatch.setitem(sys.modules, "lplb._nvshmem", fake)
    comm.init_nvshmem_runtime(one_rank_group)
    assert fake.calls == ["unique_id", ("init", 3, bytes(range(128)), 0, 1)]
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"  # NVLink multicast stays off
    comm.init_nvshmem_runtime(one_rank_group)  # the runtime of this process is reused
    assert len(fake.calls) == 2
    assert comm._runtime == comm._Runtime((0,), 3, attached=False)


def test_nvshmem_started_elsewhere_is_attached_not_bootstrapped(
    one_rank_group, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeNvshmem(status=2)  # NVSHMEM_STATUS_IS_INITIALIZED, e.g. by DeepEP
    monkeypatch.setitem(sys.modules, "lplb._nvshmem", fake)
    comm.init_nvshmem_runtime(one_rank_group)
    assert fake.calls == [("attach", 3)]
    assert comm._runtime.attached


def test_nvshmem_pes_that_are_not_the_group_ranks_are_refused(
    one_rank_group, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lplb._nvshmem", _FakeNvshmem(pe_offset=1))
    with pytest.raises(RuntimeError, match="PE i to be rank i"):
        comm.init_nvshmem_runtime(one_rank_group)
    assert comm._runtime is None
