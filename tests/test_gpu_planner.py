"""Planner.run on CUDA: equal to the CPU reference mapping of the GPU's own shares, capturable in
a CUDA graph, traceable by torch.compile(fullgraph=True), and free of host synchronisation."""

import pytest
import torch

from lplb import CUBE_8P2E, Planner, reference

pytestmark = pytest.mark.gpu

N_LOGICAL = 256
EP = 32
CUDA = torch.device("cuda")


def _planner() -> Planner:
    planner = Planner(CUBE_8P2E, N_LOGICAL + 2 * EP, N_LOGICAL, ep_size=EP)
    gen = torch.Generator().manual_seed(0)
    planner.update_redundancy_mapping(torch.rand(N_LOGICAL, generator=gen) * 1000)
    return planner


def _idx(seed: int, rows: int = 4096, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Top-8 experts per token from skewed random scores, with a few dropped (-1) slots."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(N_LOGICAL, generator=gen) * 2
    scores = torch.randn(rows, N_LOGICAL, generator=gen) + bias
    idx = scores.topk(8, dim=1).indices
    idx[torch.rand(idx.shape, generator=gen) < 0.02] = -1
    return idx.to(dtype).to(CUDA)


def _expected(planner: Planner, idx: torch.Tensor) -> torch.Tensor:
    """The CPU reference mapping of the shares the GPU solve produced for this idx."""
    workload, _ = planner.count_workload(idx, 132)
    probs, _ = planner.solve_probs(workload, torch.zeros(1, dtype=torch.int64, device=CUDA))
    idx_cpu = idx.cpu()
    _, by_sm = reference.count_idx(idx_cpu, N_LOGICAL, 8)
    return reference.map_idx(
        idx_cpu,
        probs.cpu(),
        by_sm,
        planner.log2phy.to(torch.int32),
        planner.prob_index.to(torch.int32),
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_run_matches_reference_mapping(dtype: torch.dtype) -> None:
    planner = _planner()
    idx = _idx(1, dtype=dtype)
    counter = torch.zeros(1, dtype=torch.int32, device=CUDA)
    out = planner.run(idx, counter)
    assert out.dtype == dtype and out.shape == idx.shape
    assert torch.equal(out.cpu(), _expected(planner, idx))
    assert int(counter) == planner.n_group


def test_run_in_cuda_graph_replays_with_new_idx() -> None:
    planner = _planner()
    static_idx = _idx(2)
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        planner.run(static_idx, counter)  # warm-up: device maps, error flag
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = planner.run(static_idx, counter)
    counter.zero_()
    for seed in (3, 4, 5):
        fresh = _idx(seed)
        static_idx.copy_(fresh)
        graph.replay()
        eager = planner.run(fresh, torch.zeros(1, dtype=torch.int64, device=CUDA))
        assert torch.equal(static_out, eager)
        assert torch.equal(static_out.cpu(), _expected(planner, fresh))
    assert int(counter) == 3 * planner.n_group


def test_run_under_torch_compile_fullgraph() -> None:
    planner = _planner()
    compiled = torch.compile(planner.run, fullgraph=True)
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    for seed in (6, 7):
        idx = _idx(seed)
        out = compiled(idx, counter, 132)
        assert torch.equal(out, planner.run(idx, torch.zeros_like(counter), 132))
    assert int(counter) == 2 * planner.n_group


def test_run_has_no_host_synchronisation() -> None:
    planner = _planner()  # update_redundancy_mapping already placed the maps on the GPU
    idx = _idx(8)
    counter = torch.zeros(1, dtype=torch.int64, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [planner.run(idx, counter) for _ in range(2)]  # the first call included
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = _expected(planner, idx)
    assert all(torch.equal(out.cpu(), expected) for out in outs)
    assert int(counter) == 2 * planner.n_group
