"""Planner with a process group: workloads are summed over the EP ranks (gloo, CPU processes)."""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lplb import Planner, torus_2d
from lplb.oracle import random_workloads

N_LOGICAL = 32
TOPOLOGIES = {2: torch.tensor([[1], [0]]), 4: torus_2d(2, 2)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_idx(rank: int) -> torch.Tensor:
    """Each rank routes its own tokens, with its own hot experts."""
    rng = np.random.default_rng(100 + rank)
    popularity = random_workloads(rng, 3, N_LOGICAL)[2, 0] + 1.0
    return torch.from_numpy(
        rng.choice(N_LOGICAL, size=(300 + 50 * rank, 4), p=popularity / popularity.sum())
    )


def _worker(rank: int, world: int, port: int, r2o: torch.Tensor, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        planner = Planner(r2o, N_LOGICAL + 2 * world, N_LOGICAL, group=dist.group.WORLD)
        idx = _rank_idx(rank)
        workload, by_sm = planner.count_workload(idx, 3)
        local = workload.clone()
        counter = torch.zeros(1, dtype=torch.int64)
        probs, global_workload = planner.solve_probs(workload, counter)
        mapped = planner.weighted_select_target(idx, probs, by_sm, 3)
        torch.save(
            {
                "ep_size": planner.ep_size,
                "local_unchanged": torch.equal(local, workload),
                "probs": probs,
                "global": global_workload,
                "counter": int(counter),
                "run": planner.run(idx, torch.zeros(1, dtype=torch.int64)),
                "mapped": mapped,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_probs_equal_single_process_solve_of_summed_workload(world: int, tmp_path: Path) -> None:
    r2o = TOPOLOGIES[world]
    mp.spawn(_worker, args=(world, _free_port(), r2o, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    summed = sum(
        torch.bincount(_rank_idx(r).reshape(-1), minlength=N_LOGICAL) for r in range(world)
    )
    single = Planner(r2o, N_LOGICAL + 2 * world, N_LOGICAL, ep_size=world)
    counter = torch.zeros(1, dtype=torch.int64)
    expected, _ = single.solve_probs(summed.to(torch.int32), counter)
    for rank, res in enumerate(results):
        assert res["ep_size"] == world
        assert res["local_unchanged"]
        # DeepSeek LPLB's second value: the summed workload, float32, viewed by rank.
        assert torch.equal(res["global"], summed.float().view(1, world, N_LOGICAL // world))
        assert torch.equal(res["probs"], expected)
        assert res["counter"] == int(counter) == world // r2o.shape[0]
        assert torch.equal(res["run"], res["mapped"])
        assert torch.equal(single.phy2log[res["mapped"]], _rank_idx(rank))
