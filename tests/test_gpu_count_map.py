"""CUDA count_idx and map_idx against independent oracles (torch.bincount per chunk, the CPU
reference mapping) and the mapping's conservation and validity properties."""

import numpy as np
import pytest
import torch

from lplb import CUBE_8P2E, Planner, reference

pytestmark = pytest.mark.gpu

N_LOGICAL = 256
CUDA = torch.device("cuda")


def _prefix_by_definition(idx: torch.Tensor, n_logical: int, n_sms: int) -> torch.Tensor:
    """workload_by_sm[s, e] = entries equal to e in chunks 0..s (chunks of ceil(N/n_sms))."""
    flat = idx.reshape(-1).cpu().to(torch.int64)
    chunk = max(1, -(-flat.numel() // n_sms))
    out = torch.zeros((n_sms, n_logical), dtype=torch.int64)
    for s in range(n_sms):
        part = flat[: (s + 1) * chunk]
        out[s] = torch.bincount(part[(part >= 0) & (part < n_logical)], minlength=n_logical)
    return out


def _random_idx(gen: torch.Generator, shape: tuple, n_logical: int, dtype: torch.dtype):
    """Skewed expert indices with about 5 % of -1 entries, on the CPU."""
    if int(np.prod(shape)) == 0:
        return torch.empty(shape, dtype=dtype)
    weights = torch.rand(n_logical, generator=gen) ** 4
    idx = torch.multinomial(weights, int(np.prod(shape)), replacement=True, generator=gen)
    idx[torch.rand(idx.shape, generator=gen) < 0.05] = -1
    return idx.view(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    ("shape", "n_sms"), [((4096, 8), 132), ((1000, 3), 7), ((5,), 16), ((33, 6), 1), ((0, 8), 4)]
)
def test_count_idx_matches_bincount_and_prefix(shape, n_sms: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hash((shape, n_sms)) % 2**31)
    idx = _random_idx(gen, shape, N_LOGICAL, dtype)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    workload, by_sm = torch.ops.lplb.count_idx(idx.to(CUDA), flag, N_LOGICAL, n_sms)
    flat = idx.reshape(-1).to(torch.int64)
    expected_total = torch.bincount(flat[flat >= 0], minlength=N_LOGICAL)
    assert workload.dtype == torch.int32 and by_sm.dtype == torch.int32
    assert torch.equal(workload.cpu().to(torch.int64), expected_total)
    assert torch.equal(by_sm.cpu().to(torch.int64), _prefix_by_definition(idx, N_LOGICAL, n_sms))
    assert int(flag) == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_count_idx_out_of_range_sets_flag_and_is_ignored(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    idx = _random_idx(gen, (2048, 8), N_LOGICAL, dtype)
    bad_values = [N_LOGICAL, -2, 2**31 - 1, -(2**31)]
    if dtype == torch.int64:
        bad_values += [2**40, -(2**40)]
    positions = torch.randperm(idx.numel(), generator=gen)[: len(bad_values)]
    idx.view(-1)[positions] = torch.tensor(bad_values, dtype=dtype)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    workload, by_sm = torch.ops.lplb.count_idx(idx.to(CUDA), flag, N_LOGICAL, 132)
    torch.cuda.synchronize()  # a fault inside the kernel would raise here
    flat = idx.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < N_LOGICAL)
    assert int(flag) == 1
    assert torch.equal(workload.cpu().to(torch.int64), torch.bincount(flat[valid], minlength=256))
    assert torch.equal(by_sm.cpu().to(torch.int64), _prefix_by_definition(idx, N_LOGICAL, 132))


def _layout(reordered: bool) -> Planner:
    planner = Planner(CUBE_8P2E, N_LOGICAL + 2 * 32, N_LOGICAL, ep_size=32)
    if reordered:
        history = torch.from_numpy(np.random.default_rng(3).lognormal(5, 1.5, N_LOGICAL))
        planner.update_redundancy_mapping(history)
    return planner


def _random_probs(gen: torch.Generator, shape: tuple) -> torch.Tensor:
    """Shares in [0, 1] including the exact values 0, 1/2 and 1."""
    probs = torch.rand(shape, generator=gen)
    pick = torch.randint(0, 6, shape, generator=gen)
    probs[pick == 0] = 0.0
    probs[pick == 1] = 1.0
    probs[pick == 2] = 0.5
    return probs


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("reordered", [False, True])
# (20000, 8) in 2 chunks: several rounds of map_idx per chunk.
@pytest.mark.parametrize(
    ("shape", "n_sms"), [((16384, 8), 132), ((999, 8), 13), ((7, 2), 32), ((20000, 8), 2)]
)
def test_map_idx_matches_reference(shape, n_sms: int, reordered: bool, dtype) -> None:
    planner = _layout(reordered)
    gen = torch.Generator().manual_seed(hash((shape, n_sms, reordered)) % 2**31)
    idx = _random_idx(gen, shape, N_LOGICAL, dtype)
    probs = _random_probs(gen, (planner.n_group, planner.group_size, planner.n_sets))
    log2phy = planner.log2phy.to(torch.int32)
    prob_index = planner.prob_index.to(torch.int32)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    _, by_sm = torch.ops.lplb.count_idx(idx.to(CUDA), flag, N_LOGICAL, n_sms)
    got = torch.ops.lplb.map_idx(
        idx.to(CUDA), probs.to(CUDA), by_sm, log2phy.to(CUDA), prob_index.to(CUDA), flag
    ).cpu()
    assert int(flag) == 0
    _, by_sm_cpu = reference.count_idx(idx, N_LOGICAL, n_sms)
    expected = reference.map_idx(idx, probs, by_sm_cpu, log2phy, prob_index)
    assert got.dtype == dtype and got.shape == idx.shape
    assert torch.equal(got, expected)

    # Properties, independent of the reference: -1 stays -1, every token lands on one of its
    # expert's slots, and exactly floor(n_e * x + 1/2) tokens of a replicated expert stay.
    flat, out = idx.reshape(-1).to(torch.int64), got.reshape(-1).to(torch.int64)
    assert torch.equal(out[flat < 0], flat[flat < 0])
    valid = flat >= 0
    slots = planner.log2phy[flat[valid]]
    assert bool(((out[valid] == slots[:, 0]) | (out[valid] == slots[:, 1])).all())
    counts = torch.bincount(flat[valid], minlength=N_LOGICAL)
    to_original = torch.bincount(flat[valid][out[valid] == slots[:, 0]], minlength=N_LOGICAL)
    share = probs.reshape(-1).double()[planner.prob_index.clamp(min=0)]
    keep = torch.where(
        planner.prob_index >= 0, torch.floor(counts.double() * share + 0.5), counts.double()
    )
    assert torch.equal(to_original.double(), keep)


# Replicated-expert ids of up to 11 bits, id scans over several tiles of the block, fewer warps
# than 32 (E = 2048 fills shared memory), many rounds per chunk, experts sharing a share index.
@pytest.mark.parametrize(
    ("n_logical", "replicated", "n_sms"), [(2048, 2048, 3), (1500, 700, 5), (40, 0, 2)]
)
def test_map_idx_many_replicated_experts_matches_reference(n_logical, replicated, n_sms) -> None:
    gen = torch.Generator().manual_seed(n_logical + replicated)
    idx = _random_idx(gen, (30000, 8), n_logical, torch.int64)
    n_probs = replicated + 5
    probs = _random_probs(gen, (n_probs,))
    prob_index = torch.full((n_logical,), -1, dtype=torch.int32)
    chosen = torch.randperm(n_logical, generator=gen)[:replicated]
    prob_index[chosen] = torch.randint(0, n_probs, (replicated,), generator=gen, dtype=torch.int32)
    log2phy = torch.full((n_logical, 2), -1, dtype=torch.int32)
    log2phy[:, 0] = torch.randperm(n_logical, generator=gen).to(torch.int32)
    log2phy[chosen, 1] = n_logical + torch.arange(replicated, dtype=torch.int32)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    _, by_sm = torch.ops.lplb.count_idx(idx.to(CUDA), flag, n_logical, n_sms)
    got = torch.ops.lplb.map_idx(
        idx.to(CUDA), probs.to(CUDA), by_sm, log2phy.to(CUDA), prob_index.to(CUDA), flag
    ).cpu()
    _, by_sm_cpu = reference.count_idx(idx, n_logical, n_sms)
    assert int(flag) == 0
    assert torch.equal(got, reference.map_idx(idx, probs, by_sm_cpu, log2phy, prob_index))


def test_map_idx_does_not_depend_on_n_sms() -> None:
    planner = _layout(True)
    gen = torch.Generator().manual_seed(11)
    idx = _random_idx(gen, (8192, 8), N_LOGICAL, torch.int64).to(CUDA)
    probs = _random_probs(gen, (planner.n_group, planner.group_size, planner.n_sets)).to(CUDA)
    maps = (planner.log2phy.to(CUDA, torch.int32), planner.prob_index.to(CUDA, torch.int32))
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    outs = []
    for n_sms in (1, 8, 132, 1000):
        _, by_sm = torch.ops.lplb.count_idx(idx, flag, N_LOGICAL, n_sms)
        outs.append(torch.ops.lplb.map_idx(idx, probs, by_sm, *maps, flag))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_map_idx_out_of_range_gives_minus_one() -> None:
    planner = _layout(False)
    gen = torch.Generator().manual_seed(12)
    idx = _random_idx(gen, (512, 8), N_LOGICAL, torch.int64)
    idx[0, 0], idx[1, 1], idx[2, 2] = N_LOGICAL, -7, 2**40
    probs = _random_probs(gen, (planner.n_group, planner.group_size, planner.n_sets)).to(CUDA)
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    idx_gpu = idx.to(CUDA)
    _, by_sm = torch.ops.lplb.count_idx(idx_gpu, flag, N_LOGICAL, 132)
    assert int(flag) == 1
    map_flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    out = torch.ops.lplb.map_idx(
        idx_gpu,
        probs,
        by_sm,
        planner.log2phy.to(CUDA, torch.int32),
        planner.prob_index.to(CUDA, torch.int32),
        map_flag,
    ).cpu()
    assert int(map_flag) == 1  # map_idx flags bad entries on its own too
    assert out[0, 0] == -1 and out[1, 1] == -1 and out[2, 2] == -1
    valid = (idx >= 0) & (idx < N_LOGICAL)
    assert bool((out[valid] >= 0).all())


def test_bad_sizes_raise_before_launch() -> None:
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    idx = torch.zeros(16, dtype=torch.int64, device=CUDA)
    with pytest.raises(ValueError, match="n_sms"):
        torch.ops.lplb.count_idx(idx, flag, N_LOGICAL, 0)
    with pytest.raises(ValueError, match="n_logical"):
        torch.ops.lplb.count_idx(idx, flag, 100_000, 4)
    with pytest.raises(TypeError, match="idx"):
        torch.ops.lplb.count_idx(idx.float(), flag, N_LOGICAL, 4)
    with pytest.raises(ValueError, match="error_flag"):
        torch.ops.lplb.count_idx(idx, torch.zeros(2, dtype=torch.int32, device=CUDA), 8, 4)
