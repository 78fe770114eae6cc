"""DeepSeek's module helpers (``eplb.balanced_packing``, ``eplb.replicate_experts``,
``eplb.rebalance_experts_hierarchical``) against the plain reference (eplb/reference.py), and the
size rules they share with DeepSeek's asserts. The README example is in test_eplb_deepseek.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb
from eplb import reference

KINDS = ["ties", "ints", "floats", "lognormal"]


def random_loads(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, n] loads: integers in [0, 4) (nearly all tied), integers, floats or log-normal."""
    if kind == "ties":
        return torch.randint(0, 4, (rows, n), generator=gen)
    if kind == "ints":
        return torch.randint(0, 1000, (rows, n), generator=gen)
    if kind == "floats":
        return torch.rand(rows, n, generator=gen, dtype=torch.float64) * 1000
    return torch.randn(rows, n, generator=gen).mul(1.5).exp()


def as_f32_rows(weight: torch.Tensor) -> list[list[np.float32]]:
    """The rows as the float32 values every helper computes with."""
    return [list(row) for row in weight.float().numpy()]


# (items, packs): one item per pack, one pack, and packs of more than 16 items (past torch's
# insertion sort)
PACKINGS = [(8, 8), (8, 1), (12, 4), (16, 2), (64, 4), (256, 8), (10, 5)]


@pytest.mark.parametrize(("n", "packs"), PACKINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_balanced_packing_matches_reference(n: int, packs: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(n * 100 + packs)
    weight = random_loads(kind, 5, n, gen)
    pack, rank = eplb.balanced_packing(weight, packs)
    assert pack.dtype == rank.dtype == torch.int64 and pack.shape == (5, n)
    for x, row in enumerate(as_f32_rows(weight)):
        want_pack, want_rank = reference.balanced_packing(row, packs)
        assert pack[x].tolist() == want_pack
        assert rank[x].tolist() == want_rank


# (experts, slots): no replication, a few copies, many copies of few experts
REPLICATIONS = [(8, 8), (8, 12), (12, 16), (4, 32), (64, 80), (256, 320)]


@pytest.mark.parametrize(("n", "slots"), REPLICATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_replicate_experts_matches_reference(n: int, slots: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + slots)
    weight = random_loads(kind, 4, n, gen)
    phy2log, rank, logcnt = eplb.replicate_experts(weight, slots)
    assert phy2log.shape == rank.shape == (4, slots) and logcnt.shape == (4, n)
    for x, row in enumerate(as_f32_rows(weight)):
        want = reference.replicate_experts(row, slots)
        assert (phy2log[x].tolist(), rank[x].tolist(), logcnt[x].tolist()) == want


# (experts, replicas, groups, nodes, gpus)
HIERARCHICAL = [
    (12, 16, 4, 2, 8),  # the README shape
    (16, 24, 4, 2, 4),
    (16, 16, 4, 4, 4),  # no replication, one group per node
    (24, 36, 6, 3, 6),
    (64, 80, 8, 4, 16),
    (256, 288, 8, 4, 32),  # DeepSeek-V3
    (20, 30, 5, 1, 5),  # one node
]


@pytest.mark.parametrize("shape", HIERARCHICAL)
@pytest.mark.parametrize("kind", KINDS)
def test_rebalance_experts_hierarchical_matches_reference(shape: tuple, kind: str) -> None:
    experts, replicas, groups, nodes, gpus = shape
    gen = torch.Generator().manual_seed(sum(shape))
    weight = random_loads(kind, 3, experts, gen)
    phy2log, phyrank, logcnt = eplb.rebalance_experts_hierarchical(
        weight, replicas, groups, nodes, gpus
    )
    for t in (phy2log, phyrank, logcnt):
        assert t.dtype == torch.int64 and t.device.type == "cpu"
    for layer, row in enumerate(as_f32_rows(weight)):
        want = reference.rebalance_layer(row, replicas, groups, nodes, gpus)
        got = (phy2log[layer].tolist(), phyrank[layer].tolist(), logcnt[layer].tolist())
        assert got == want
    # rebalance_experts is the same algorithm, with log2phy built from these ranks.
    full = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert torch.equal(full[0], phy2log) and torch.equal(full[2], logcnt)
    assert torch.equal(full[1], eplb.log2phy_from_ranks(phy2log, phyrank, logcnt))


W = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
BAD_SIZES = [
    pytest.param(eplb.balanced_packing, (W, 3), id="packs-do-not-divide-items"),
    pytest.param(eplb.replicate_experts, (W, 7), id="fewer-slots-than-experts"),
    pytest.param(eplb.rebalance_experts_hierarchical, (W, 10, 2, 1, 4), id="replicas%gpus"),
    pytest.param(eplb.rebalance_experts_hierarchical, (W, 6, 2, 1, 2), id="replicas<experts"),
    pytest.param(eplb.rebalance_experts_hierarchical, (W, 8, 3, 1, 2), id="experts%groups"),
    pytest.param(eplb.rebalance_experts_hierarchical, (W, 8, 2, 4, 4), id="groups%nodes"),
    pytest.param(eplb.rebalance_experts_hierarchical, (W, 12, 4, 2, 3), id="gpus%nodes"),
    pytest.param(eplb.rebalance_experts, (W, 10, 2, 1, 4), id="rebalance-replicas%gpus"),
    pytest.param(eplb.rebalance_experts, (W, 6, 1, 1, 2), id="rebalance-replicas<experts"),
    pytest.param(eplb.rebalance_experts, (W, 8, 3, 3, 2), id="rebalance-experts%groups"),
    pytest.param(eplb.rebalance_experts, (W, 12, 4, 2, 3), id="rebalance-gpus%nodes"),
]


@pytest.mark.parametrize(("fn", "args"), BAD_SIZES)
def test_bad_sizes_raise_value_and_assertion_errors(fn, args: tuple) -> None:
    # DeepSeek's eplb.py checks these with `assert`: code catching AssertionError still works.
    with pytest.raises(AssertionError) as caught:
        fn(*args)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, eplb.LayoutError)


# (experts, replicas, groups, nodes, gpus) where nodes divide neither the groups nor the GPUs
GLOBAL = [(12, 16, 4, 3, 4), (10, 16, 2, 5, 8), (9, 12, 3, 2, 3), (16, 20, 1, 2, 5)]


@pytest.mark.parametrize("shape", GLOBAL)
@pytest.mark.parametrize("policy", eplb.POLICIES)
def test_global_policy_accepts_any_node_count(shape: tuple, policy: str) -> None:
    experts, replicas, groups, nodes, gpus = shape
    assert groups % nodes and gpus % nodes
    weight = random_loads("ties", 3, experts, torch.Generator().manual_seed(experts))
    got = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)
    # As DeepSeek's: the global policy is the hierarchical one with one group on one node (not
    # num_nodes=1 alone, which would still pack the groups and renumber experts by group load).
    want = eplb.rebalance_experts(weight, replicas, 1, 1, gpus, policy=policy)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    if policy == "deepseek":
        ref = reference.rebalance_experts(weight, replicas, groups, nodes, gpus)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    # The hierarchical helper itself, like DeepSeek's, insists on the node rules.
    with pytest.raises(AssertionError):
        eplb.rebalance_experts_hierarchical(weight, replicas, groups, nodes, gpus)


def test_module_helpers_compute_in_float32() -> None:
    # 1 + 2**-30 is 1.0 in float32: the tie goes to the lower index, as for rebalance_experts
    # (DeepSeek's replicate_experts, called on this float64 tensor, would divide in float64 and
    # copy expert 1).
    weight = torch.tensor([[1.0, 1.0 + 2**-30]], dtype=torch.float64)
    phy2log, rank, logcnt = eplb.replicate_experts(weight, 3)
    assert phy2log.tolist() == [[0, 1, 0]] and rank.tolist() == [[0, 0, 1]]
    assert logcnt.tolist() == [[2, 1]]
    for got, want in zip(phy2log, eplb.replicate_experts(weight.float(), 3)[0], strict=True):
        assert torch.equal(got, want)
    # Pack sums in float32 too. Packs get 2**24 each, then one takes a 1: 2**24 + 1 is 2**24 in
    # float32, so the packs still tie and the second 1 joins the first (float64 sums would send
    # it to the other pack).
    weight = torch.tensor([[2.0**24, 2.0**24, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    pack, _ = eplb.balanced_packing(weight, 2)
    assert pack[0, 2] == pack[0, 3]
    assert pack.tolist() == [reference.balanced_packing(as_f32_rows(weight)[0], 2)[0]]


def test_outputs_follow_the_documented_devices_and_dtypes() -> None:
    weight = [[3, 1, 4, 1], [5, 9, 2, 6]]  # lists are accepted; outputs are int64 on the CPU
    for out in (
        *eplb.balanced_packing(weight, 2),
        *eplb.replicate_experts(weight, 6),
        *eplb.rebalance_experts_hierarchical(weight, 8, 2, 2, 4),
    ):
        assert out.dtype == torch.int64 and out.device.type == "cpu"


@pytest.mark.gpu
def test_packing_and_replication_return_on_the_input_device() -> None:
    weight = torch.rand(3, 16, device="cuda")
    for out in (*eplb.balanced_packing(weight, 4), *eplb.replicate_experts(weight, 20)):
        assert out.device == weight.device
    cpu = weight.cpu()
    assert torch.equal(eplb.balanced_packing(weight, 4)[0].cpu(), eplb.balanced_packing(cpu, 4)[0])
    for out in eplb.rebalance_experts_hierarchical(weight, 24, 4, 2, 4):
        assert out.device.type == "cpu"
