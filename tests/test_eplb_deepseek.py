"""eplb.rebalance_experts(policy="deepseek") against the plain-loop reference."""

import pytest
import torch

import eplb
from eplb.reference import rebalance_experts as reference

# (num_experts, num_replicas, num_groups, num_nodes, num_gpus)
HIERARCHICAL = [
    (12, 16, 4, 2, 8),  # DeepSeek's README example shape
    (16, 24, 4, 2, 4),
    (32, 48, 8, 4, 8),
    (24, 36, 6, 2, 6),
    (16, 16, 4, 2, 4),  # no replication
    (16, 32, 4, 4, 8),  # one group per node: group packing is the identity
    (8, 16, 4, 2, 16),  # one slot per GPU: GPU packing is the identity
    (8, 12, 8, 4, 4),  # one GPU per node, groups of one expert
    (64, 80, 8, 4, 16),
    (128, 176, 8, 2, 8),  # packs of more than 16 items: torch's sort is no longer insertion sort
]
GLOBAL = [
    (12, 16, 3, 2, 8),  # num_nodes does not divide num_groups
    (16, 20, 1, 1, 4),
    (10, 10, 1, 1, 2),  # no replication
    (7, 9, 1, 1, 1),  # one GPU
    (9, 12, 1, 1, 12),  # one slot per GPU
    (33, 48, 5, 2, 8),
    (100, 130, 1, 1, 10),
]


def random_loads(kind: str, layers: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Random [layers, experts] loads: floats, distinct integers per layer, or "ties": integers in
    [0, 4), nearly all tied (the reference's torch sort orders ties; so must we)."""
    if kind == "ties":
        return torch.randint(0, 4, (layers, experts), generator=gen)
    if kind == "float":
        return torch.rand(layers, experts, generator=gen) * 1000
    if kind == "lognormal":
        return torch.randn(layers, experts, generator=gen).mul(1.5).exp()
    # distinct integers within each layer
    rows = [torch.randperm(50 * experts, generator=gen)[:experts] for _ in range(layers)]
    return torch.stack(rows)


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w, name in zip(got, want, ("phy2log", "log2phy", "logcnt"), strict=True):
        assert g.dtype == torch.int64 and g.device.type == "cpu", name
        assert torch.equal(g, w), name


def test_readme_example():
    weight = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    out = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    expected = torch.tensor(
        [
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
        ]
    )
    assert torch.equal(out[0], expected)
    assert_same(out, reference(weight, 16, 4, 2, 8))


@pytest.mark.parametrize("shape", HIERARCHICAL + GLOBAL)
@pytest.mark.parametrize("kind", ["float", "lognormal", "int", "ties"])
def test_matches_reference(shape, kind):
    experts, replicas, groups, nodes, gpus = shape
    gen = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    for layers in (1, 3):
        weight = random_loads(kind, layers, experts, gen)
        assert_same(
            eplb.rebalance_experts(weight, replicas, groups, nodes, gpus),
            reference(weight, replicas, groups, nodes, gpus),
        )


def test_deepseek_v3_scale():
    gen = torch.Generator().manual_seed(7)
    weight = random_loads("lognormal", 6, 256, gen)
    for config in ((288, 8, 4, 32), (320, 1, 1, 64)):
        assert_same(eplb.rebalance_experts(weight, *config), reference(weight, *config))


def test_ties_go_to_the_lower_index():
    # Equal loads everywhere: the stable order decides every choice.
    weight = torch.ones(2, 8)
    out = eplb.rebalance_experts(weight, 12, 4, 2, 4)
    assert_same(out, reference(weight, 12, 4, 2, 4))
    # Groups 0, 2 go to node 0 and groups 1, 3 to node 1 (each tie to the lower pack); within a
    # node the two extra copies go to its first two experts: 0, 1 on node 0 and 2, 3 on node 1.
    assert out[2].tolist() == [[2, 2, 2, 2, 1, 1, 1, 1]] * 2


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(3)
    weight = (torch.rand(2, 16, generator=gen) * 500).to(dtype)
    assert_same(eplb.rebalance_experts(weight, 24, 4, 2, 4), reference(weight, 24, 4, 2, 4))


def test_non_contiguous_and_list_inputs():
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(16, 6, generator=gen)
    weight = base.t()[::2]  # [3, 16], strided
    assert not weight.is_contiguous()
    want = reference(weight.contiguous(), 24, 4, 2, 4)
    assert_same(eplb.rebalance_experts(weight, 24, 4, 2, 4), want)
    assert_same(eplb.rebalance_experts(weight.tolist(), 24, 4, 2, 4), want)


def test_requires_grad_input():
    weight = torch.rand(2, 8, requires_grad=True)
    assert_same(eplb.rebalance_experts(weight, 12, 1, 1, 4), reference(weight, 12, 1, 1, 4))


@pytest.mark.parametrize(
    ("weight", "args", "error", "match"),
    [
        (torch.rand(8), (8, 1, 1, 2), ValueError, r"2-D"),
        (torch.rand(2, 0), (8, 1, 1, 2), ValueError, r"2-D"),
        (torch.rand(2, 8) > 0.5, (8, 1, 1, 2), TypeError, "bool"),
        (torch.tensor([[1.0, float("nan")]]), (2, 1, 1, 1), ValueError, "nan"),
        (torch.tensor([[1.0, float("inf")]]), (2, 1, 1, 1), ValueError, "inf"),
        (torch.tensor([[1.0, -3.0]]), (2, 1, 1, 1), ValueError, "-3"),
        (torch.rand(2, 8), (10, 1, 1, 4), ValueError, "num_replicas=10"),
        (torch.rand(2, 8), (6, 1, 1, 2), ValueError, "num_replicas=6"),
        (torch.rand(2, 8), (12, 2, 2, 3), ValueError, "num_gpus=3"),
        (torch.rand(2, 8), (12, 3, 1, 4), ValueError, "num_groups=3"),
        (torch.rand(2, 8), (0, 1, 1, 2), ValueError, "num_replicas"),
        (torch.rand(2, 8), (8, 1, -1, 2), ValueError, "num_nodes"),
        (torch.rand(2, 8), (8.0, 1, 1, 2), TypeError, "num_replicas"),
        (torch.rand(2, 8), (8, True, 1, 2), TypeError, "num_groups"),
        ("not a tensor", (8, 1, 1, 2), TypeError, "not a tensor"),
    ],
)
def test_bad_inputs(weight, args, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(weight, *args)


def test_bad_policy():
    with pytest.raises(ValueError, match="'greedy'"):
        eplb.rebalance_experts(torch.rand(2, 8), 8, 1, 1, 2, policy="greedy")
