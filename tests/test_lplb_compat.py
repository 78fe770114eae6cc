"""Drop-in compatibility with DeepSeek LPLB's Planner: its attribute names, maps on the device
of r2o, and its own usage pattern (scatter-add counts, per-set shares of the mapped tokens)."""

import pytest
import torch

from lplb import CUBE_8P2E, RING_8P, Planner

N_LOGICAL, EP = 256, 32


@pytest.mark.parametrize(("r2o", "k"), [(CUBE_8P2E, 2), (CUBE_8P2E, 4), (RING_8P, 3)])
def test_lplb_attribute_names(r2o: torch.Tensor, k: int) -> None:
    planner = Planner(r2o.int(), N_LOGICAL + k * EP, N_LOGICAL, EP)
    assert planner.n_routed_experts == N_LOGICAL + k * EP
    assert planner.n_logical_routed_experts == N_LOGICAL
    assert planner.n_local_routed_experts == (N_LOGICAL + k * EP) // EP
    assert planner.n_local_logical_routed_experts == N_LOGICAL // EP
    assert planner.num_redundants == r2o.shape[1]
    assert planner.combined_redundant_experts * r2o.shape[1] == k
    assert planner.n_group * planner.group_size == EP


def _check_lplb_usage(device: torch.device) -> None:
    """DeepSeek LPLB's own test pattern, with exact expectations instead of its tolerances."""
    planner = Planner(CUBE_8P2E.int().to(device), N_LOGICAL + 2 * EP, N_LOGICAL, EP)
    gen = torch.Generator().manual_seed(0)
    history = ((torch.randn(N_LOGICAL, generator=gen) * 0.15 + 1).clamp_min(0) * 2**20).long()
    phy2log, log2phy, logcnt = planner.update_redundancy_mapping(history.to(device))
    for t in (phy2log, log2phy, logcnt, planner.r2o, planner.o2r):
        assert t.device == device

    idx = torch.randint(-1, N_LOGICAL, (65536,), generator=gen).to(device)
    n_sms = 16
    workload, by_sm = planner.count_workload(idx, n_sms)
    expected = torch.zeros(N_LOGICAL + 1, dtype=torch.long, device=device)
    expected.scatter_add_(0, idx.long() + 1, torch.ones_like(idx).long())
    assert torch.equal(workload.long(), expected[1:])

    shape = (planner.n_group, planner.group_size, planner.num_redundants)
    probs = (torch.randn(shape, generator=gen) / 3 + 0.5).clamp(0, 1).to(device)
    mapped = planner.weighted_select_target(idx, probs, by_sm, n_sms)
    assert torch.equal(mapped == -1, idx == -1)
    padded = torch.cat([torch.full((1, 2), -1, device=device), log2phy])
    assert torch.all((mapped == padded[idx + 1, 0]) | (mapped == padded[idx + 1, 1]))

    freq = torch.zeros(planner.n_routed_experts + 1, dtype=torch.long, device=device)
    freq.scatter_add_(0, mapped.long() + 1, torch.ones_like(mapped).long())
    per_rank = freq[1:].view(planner.n_group, planner.group_size, -1)
    c, d = planner.combined_redundant_experts, planner.num_redundants
    original = per_rank[:, :, : c * d].reshape(*shape[:2], c, d)
    copies = per_rank[:, :, -c * d :].reshape(*shape[:2], c, d)
    # The copy of rank r's set d sits on rank o2r[r, d]: gather it back to rank r.
    index = planner.o2r.long()[None, :, None, :].expand(planner.n_group, -1, c, -1)
    copies = copies.gather(1, index)
    # Each expert keeps round(x * n) tokens, within half a token of its share.
    total = (original + copies).sum(2).double()
    assert torch.all((probs.double() * total - original.sum(2)).abs() <= 0.5 * c)


def test_lplb_usage_on_cpu() -> None:
    _check_lplb_usage(torch.device("cpu"))


@pytest.mark.gpu
def test_lplb_usage_on_gpu() -> None:
    _check_lplb_usage(torch.device("cuda", torch.cuda.current_device()))
