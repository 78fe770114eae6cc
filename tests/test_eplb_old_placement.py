"""rebalance_experts(policy="balanced", old_phy2log=...): fewer moved experts, same balance."""

import pytest
import torch
from test_eplb_balanced import check_placement, gpu_max_loads, random_loads

import eplb

CONFIGS = [  # (num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    (256, 288, 8, 4, 32),
    (256, 320, 1, 1, 64),
    (64, 80, 8, 2, 16),
    (16, 24, 4, 2, 8),
]


def balanced(weight, shape, old=None):
    _, replicas, groups, nodes, gpus = shape
    return eplb.rebalance_experts(
        weight, replicas, groups, nodes, gpus, policy="balanced", old_phy2log=old
    )


def assert_no_worse(weight, with_old, without_old, gpus):
    """Balance with the old placement is at least that without it, on every layer."""
    a = gpu_max_loads(weight, with_old, gpus)
    b = gpu_max_loads(weight, without_old, gpus)
    assert all(x <= y * (1 + 1e-12) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("shape", CONFIGS)
def test_same_weights_change_nothing(shape):
    gen = torch.Generator().manual_seed(1)
    weight = random_loads("lognormal", 8, shape[0], gen)
    first = balanced(weight, shape)
    again = balanced(weight, shape, first[0])
    assert len(again) == 4
    assert again[3].tolist() == [0] * 8
    for a, b in zip(first, again[:3], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", CONFIGS)
def test_permuted_gpus_are_recognised(shape):
    """An old placement that is ours with GPUs relabelled (within nodes, nodes as units) and
    slots shuffled is restored exactly: the new placement follows the old labels."""
    experts, replicas, groups, nodes, gpus = shape
    num_nodes = nodes if groups % nodes == 0 else 1
    per_gpu, per_node = replicas // gpus, gpus // num_nodes
    gen = torch.Generator().manual_seed(2)
    weight = random_loads("zipf", 4, experts, gen)
    placed = balanced(weight, shape)[0]
    node_order = torch.randperm(num_nodes, generator=gen)
    gpu_order = torch.cat(
        [n * per_node + torch.randperm(per_node, generator=gen) for n in node_order]
    )
    old = placed.view(4, gpus, per_gpu)[:, gpu_order]
    old = old.gather(2, torch.argsort(torch.rand(old.shape, generator=gen), dim=2)).reshape(4, -1)
    out = balanced(weight, shape, old)
    assert out[3].tolist() == [0] * 4
    assert torch.equal(out[0], old)


@pytest.mark.parametrize("shape", CONFIGS)
def test_perturbed_weights_change_few_slots(shape):
    experts, _, _, _, gpus = shape
    gen = torch.Generator().manual_seed(3)
    weight = random_loads("lognormal", 8, experts, gen)
    old = balanced(weight, shape)[0]
    for noise in (0.01, 0.05):
        new_weight = weight * (1 + noise * torch.randn(weight.shape, generator=gen)).clamp(min=0)
        fresh = balanced(new_weight, shape)
        kept = balanced(new_weight, shape, old)
        check_placement(kept[:3], *shape)
        assert torch.equal(kept[3], (kept[0] != old).sum(1))
        assert_no_worse(new_weight, kept[0], fresh[0], gpus)
        moved_fresh = (fresh[0] != old).sum(1)
        assert (kept[3] <= moved_fresh).all()
        assert kept[3].sum() <= 0.5 * moved_fresh.sum()


def test_old_deepseek_placement_with_repeats():
    """A DeepSeek placement (with repeated experts) is a valid old placement."""
    gen = torch.Generator().manual_seed(4)
    weight = random_loads("zipf", 6, 256, gen)
    old = eplb.rebalance_experts(weight, 320, 1, 1, 64)[0]
    assert eplb.count_duplicate_rows(old, 64) > 0
    kept = eplb.rebalance_experts(weight, 320, 1, 1, 64, policy="balanced", old_phy2log=old)
    fresh = eplb.rebalance_experts(weight, 320, 1, 1, 64, policy="balanced")
    check_placement(kept[:3], 256, 320, 1, 1, 64)
    assert_no_worse(weight, kept[0], fresh[0], 64)
    assert torch.equal(kept[3], (kept[0] != old).sum(1))
    assert (kept[3] <= (fresh[0] != old).sum(1)).all()


@pytest.mark.parametrize("shape", [(64, 80, 8, 2, 16), (32, 48, 1, 1, 8)])
def test_partial_old_placement(shape):
    """Unused (-1) slots and missing experts in the old placement are tolerated."""
    experts, _, _, _, gpus = shape
    gen = torch.Generator().manual_seed(5)
    weight = random_loads("lognormal2", 4, experts, gen)
    old = balanced(weight, shape)[0].clone()
    old[:, ::3] = -1
    kept = balanced(weight, shape, old)
    check_placement(kept[:3], *shape)
    assert torch.equal(kept[3], (kept[0] != old).sum(1))
    assert_no_worse(weight, kept[0], balanced(weight, shape)[0], gpus)
    used = old >= 0
    assert ((kept[0] != old) & used).sum() <= 0.1 * used.sum()  # the used slots mostly stay


@pytest.mark.parametrize(
    ("old", "policy", "error", "match"),
    [
        (torch.zeros(2, 24, dtype=torch.long), "deepseek", ValueError, "policy='balanced'"),
        (torch.zeros(2, 23, dtype=torch.long), "balanced", ValueError, r"\(2, 24\)"),
        (torch.zeros(24, dtype=torch.long), "balanced", ValueError, r"\(24,\)"),
        (torch.full((2, 24), 16), "balanced", ValueError, "16"),
        (torch.full((2, 24), -2), "balanced", ValueError, "-2"),
        (torch.zeros(2, 24), "balanced", TypeError, "float32"),
    ],
)
def test_bad_old_placement(old, policy, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(torch.rand(2, 16), 24, 4, 2, 8, policy=policy, old_phy2log=old)
