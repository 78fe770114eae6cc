"""eplb.rebalance_experts(policy="balanced"): duplicate-free, never below DeepSeek's balance
where that is achievable, consistent maps. Loads and invariants are recomputed here with plain
loops; tiny cases are checked against an exhaustive search."""

import pytest
import torch

import eplb
from eplb.reference import best_duplicate_free_max

# (num_experts, num_replicas, num_groups, num_nodes, num_gpus)
SHAPES = [
    (256, 288, 8, 4, 32),  # DeepSeek-V3, hierarchical
    (256, 320, 1, 1, 64),  # DeepSeek-V3, global
    (128, 160, 8, 4, 32),
    (64, 80, 8, 2, 16),
    (64, 96, 4, 4, 16),
    (64, 72, 3, 2, 8),  # global: 2 does not divide 3
    (64, 128, 1, 1, 32),
    (48, 64, 4, 2, 8),
    (32, 48, 1, 1, 8),
    (16, 24, 1, 1, 4),
    (16, 32, 1, 1, 8),
]
KINDS = ["lognormal", "lognormal2", "zipf", "uniform", "int", "zipf_int"]


def random_loads(kind: str, layers: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "lognormal":
        return torch.randn(layers, experts, generator=gen).exp()
    if kind == "lognormal2":
        return torch.randn(layers, experts, generator=gen).mul(2).exp()
    if kind == "uniform":
        return torch.rand(layers, experts, generator=gen)
    if kind == "int":
        return torch.randint(0, 100, (layers, experts), generator=gen)
    rank = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)]) + 1
    zipf = 1000.0 / rank.double() ** 1.1
    return zipf.round().long() if kind == "zipf_int" else zipf


def gpu_max_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> list[float]:
    """Per layer, the heaviest GPU; a copy of e carries weight[e] / (copies of e)."""
    per_gpu = phy2log.shape[1] // num_gpus
    result = []
    for w, row in zip(weight.double().tolist(), phy2log.tolist(), strict=True):
        copies = [row.count(e) for e in range(len(w))]
        loads = [0.0] * num_gpus
        for p, e in enumerate(row):
            loads[p // per_gpu] += w[e] / copies[e]
        result.append(max(loads))
    return result


def check_placement(out, num_experts, num_replicas, num_groups, num_nodes, num_gpus):
    """Shapes, ranges, no repeats on a GPU, copy caps, node layout and map consistency."""
    phy2log, log2phy, logcnt = out
    layers = phy2log.shape[0]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, num_experts)
    assert log2phy.shape == (layers, num_experts, int(logcnt.max()))
    hierarchical = num_groups % num_nodes == 0
    nodes = num_nodes if hierarchical else 1
    per_gpu, gpus_per_node = num_replicas // num_gpus, num_gpus // nodes
    group_size = num_experts // (num_groups if hierarchical else 1)
    for layer in range(layers):
        row = phy2log[layer].tolist()
        assert all(0 <= e < num_experts for e in row)
        for g in range(num_gpus):
            on_gpu = row[g * per_gpu : (g + 1) * per_gpu]
            assert len(set(on_gpu)) == per_gpu, f"layer {layer} GPU {g} repeats an expert"
        node_of = {}
        for p, e in enumerate(row):
            node = p // (per_gpu * gpus_per_node)
            assert node_of.setdefault(e, node) == node, f"expert {e} on two nodes"
        for e in range(num_experts):
            slots = [p for p, x in enumerate(row) if x == e]
            assert 1 <= len(slots) <= gpus_per_node
            assert logcnt[layer, e] == len(slots)
            assert log2phy[layer, e].tolist() == slots + [-1] * (log2phy.shape[2] - len(slots))
            assert node_of[e] == node_of[e - e % group_size], "group split across nodes"


@pytest.mark.parametrize("shape", SHAPES)
def test_never_below_deepseek(shape):
    experts, replicas, groups, nodes, gpus = shape
    gen = torch.Generator().manual_seed(sum(shape))
    for kind in KINDS:
        weight = random_loads(kind, 6, experts, gen)
        ref = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
        out = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, policy="balanced")
        check_placement(out, *shape)
        ours = gpu_max_loads(weight, out[0], gpus)
        theirs = gpu_max_loads(weight, ref[0], gpus)
        for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert a <= b * (1 + 1e-12), (kind, layer, a, b)


@pytest.mark.parametrize(
    "shape",
    [(4, 8, 1, 1, 4), (5, 6, 1, 1, 2), (6, 8, 1, 1, 4), (6, 9, 1, 1, 3), (12, 16, 4, 2, 8)],
)
def test_tiny_cases_against_exhaustive_search(shape):
    """Whenever some duplicate-free placement is as light as DeepSeek's, ours is too."""
    experts, replicas, groups, nodes, gpus = shape
    hierarchical = groups % nodes == 0
    num_nodes = nodes if hierarchical else 1
    gpus_per_node, per_gpu = gpus // num_nodes, replicas // gpus
    slots_per_node = gpus_per_node * per_gpu
    gen = torch.Generator().manual_seed(11)
    matched = 0
    for kind in ("lognormal", "uniform", "zipf"):
        weight = random_loads(kind, 12, experts, gen).double()
        ref = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
        out = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, policy="balanced")
        check_placement(out, *shape)
        ours = gpu_max_loads(weight, out[0], gpus)
        theirs = gpu_max_loads(weight, ref[0], gpus)
        for layer in range(weight.shape[0]):
            best = 0.0
            for node in range(num_nodes):
                on_node = ref[0][layer, node * slots_per_node : (node + 1) * slots_per_node]
                node_weights = [float(weight[layer, e]) for e in sorted(set(on_node.tolist()))]
                best = max(best, best_duplicate_free_max(node_weights, gpus_per_node, per_gpu))
            assert ours[layer] >= best * (1 - 1e-12)  # the oracle is a lower bound
            if best <= theirs[layer] * (1 + 1e-12):
                assert ours[layer] <= theirs[layer] * (1 + 1e-12), (kind, layer)
                matched += 1
    assert matched > 0


def test_where_deepseek_cannot_be_matched():
    """DeepSeek's repeat can beat every duplicate-free placement: loads [10, 8, 1], 2 GPUs x 2.

    DeepSeek gives expert 0 two copies and packs {8, 1} | {5, 5}: heaviest 10 with expert 0
    twice on GPU 1. Without repeats the best is counts [1, 1, 2]: {10, 0.5} | {8, 0.5} -> 10.5.
    """
    weight = torch.tensor([[10.0, 8.0, 1.0]])
    ref = eplb.rebalance_experts(weight, 4, 1, 1, 2)
    assert ref[0].tolist() == [[1, 2, 0, 0]]
    out = eplb.rebalance_experts(weight, 4, 1, 1, 2, policy="balanced")
    check_placement(out, 3, 4, 1, 1, 2)
    assert gpu_max_loads(weight, out[0], 2) == [10.5] == [best_duplicate_free_max([10, 8, 1], 2, 2)]


@pytest.mark.parametrize("config", [(288, 8, 4, 32), (320, 1, 1, 64)])
@pytest.mark.parametrize("kind", ["lognormal2", "zipf"])
def test_better_on_average_on_heavy_tails(config, kind):
    gen = torch.Generator().manual_seed(5)
    weight = random_loads(kind, 16, 256, gen)
    ref = eplb.rebalance_experts(weight, *config)
    out = eplb.rebalance_experts(weight, *config, policy="balanced")
    gpus = config[3]
    mean_load = weight.double().sum(1) / gpus
    ours = mean_load / torch.tensor(gpu_max_loads(weight, out[0], gpus), dtype=torch.float64)
    theirs = mean_load / torch.tensor(gpu_max_loads(weight, ref[0], gpus), dtype=torch.float64)
    assert ours.mean() > theirs.mean() + 1e-3


def test_readme_example_and_determinism():
    weight = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    out = eplb.rebalance_experts(weight, 16, 4, 2, 8, policy="balanced")
    check_placement(out, 12, 16, 4, 2, 8)
    ref = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    ours, theirs = gpu_max_loads(weight, out[0], 8), gpu_max_loads(weight, ref[0], 8)
    assert all(a <= b * (1 + 1e-12) for a, b in zip(ours, theirs, strict=True))
    again = eplb.rebalance_experts(weight, 16, 4, 2, 8, policy="balanced")
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


def test_removes_deepseek_duplicates_at_scale():
    gen = torch.Generator().manual_seed(2)
    weight = random_loads("zipf", 8, 256, gen)
    ref = eplb.rebalance_experts(weight, 320, 1, 1, 64)
    assert eplb.count_duplicate_rows(ref[0], 64) > 0  # the defect being fixed
    out = eplb.rebalance_experts(weight, 320, 1, 1, 64, policy="balanced")
    check_placement(out, 256, 320, 1, 1, 64)


def test_zero_and_constant_loads():
    for weight in (torch.zeros(2, 16), torch.ones(2, 16)):
        out = eplb.rebalance_experts(weight, 24, 4, 2, 4, policy="balanced")
        check_placement(out, 16, 24, 4, 2, 4)


def test_too_many_slots_per_gpu():
    # 4 experts per node cannot fill 6 distinct slots per GPU.
    with pytest.raises(ValueError, match="slots per GPU"):
        eplb.rebalance_experts(torch.rand(1, 8), 24, 2, 2, 4, policy="balanced")
    out = eplb.rebalance_experts(torch.rand(1, 8), 16, 2, 2, 4, policy="balanced")
    check_placement(out, 8, 16, 2, 2, 4)
