"""eplb.metrics against hand-computed cases and plain loops."""

import pytest
import torch

from eplb import maps, metrics


def plain_inverse(row: list[int], num_logical: int) -> tuple[list[list[int]], list[int]]:
    slots = [[p for p, e in enumerate(row) if e == x] for x in range(num_logical)]
    width = max((len(s) for s in slots), default=0)
    return [s + [-1] * (width - len(s)) for s in slots], [len(s) for s in slots]


def test_phy2log_to_log2phy_hand_case():
    log2phy, logcnt = maps.phy2log_to_log2phy(torch.tensor([2, 0, 2, -1, 1, 2]))
    assert logcnt.tolist() == [1, 1, 3]
    assert log2phy.tolist() == [[1, -1, -1], [4, -1, -1], [0, 2, 5]]


def test_phy2log_to_log2phy_random_against_loops():
    gen = torch.Generator().manual_seed(0)
    phy2log = torch.randint(-1, 9, (5, 40), generator=gen)
    log2phy, logcnt = maps.phy2log_to_log2phy(phy2log, num_logical=11)
    assert log2phy.shape[:2] == (5, 11) and logcnt.shape == (5, 11)
    for layer, row in enumerate(phy2log.tolist()):
        want_log2phy, want_cnt = plain_inverse(row, 11)
        assert logcnt[layer].tolist() == want_cnt
        assert log2phy[layer, :, : len(want_log2phy[0])].tolist() == want_log2phy
        assert (log2phy[layer, :, len(want_log2phy[0]) :] == -1).all()


def test_phy2log_to_log2phy_errors():
    with pytest.raises(ValueError, match="num_logical=2"):
        maps.phy2log_to_log2phy(torch.tensor([0, 3]), num_logical=2)
    with pytest.raises(ValueError, match="-2"):
        maps.phy2log_to_log2phy(torch.tensor([0, -2]))
    with pytest.raises(TypeError, match="float"):
        maps.phy2log_to_log2phy(torch.tensor([0.0, 1.0]))


def test_log2phy_from_ranks():
    phy2log = torch.tensor([[1, 0, 1, 1]])
    phyrank = torch.tensor([[2, 0, 0, 1]])
    logcnt = torch.tensor([[1, 3]])
    log2phy = maps.log2phy_from_ranks(phy2log, phyrank, logcnt)
    assert log2phy.tolist() == [[[1, -1, -1], [2, 3, 0]]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        maps.log2phy_from_ranks(phy2log, torch.tensor([[3, 0, 0, 1]]), logcnt)


def test_gpu_loads_hand_case():
    # 2 GPUs x 3 slots. Expert 0 (load 6) has 2 copies, expert 1 (load 3) one, expert 2 (load 4)
    # two; slot 5 unused: GPU 0 = 3 + 3 + 2, GPU 1 = 3 + 2 + 0.
    weight = torch.tensor([6.0, 3.0, 4.0])
    loads = metrics.gpu_loads(weight, torch.tensor([0, 1, 2, 0, 2, -1]), 2)
    assert loads.dtype == torch.float64
    assert loads.tolist() == [8.0, 5.0]
    batched = metrics.gpu_loads(weight.repeat(2, 1), torch.tensor([[0, 1, 2, 0, 2, -1]] * 2), 2)
    assert batched.tolist() == [[8.0, 5.0]] * 2


def test_gpu_loads_random_against_loops():
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(3, 10, generator=gen)
    phy2log = torch.randint(0, 10, (3, 24), generator=gen)
    loads = metrics.gpu_loads(weight, phy2log, 6)
    for layer in range(3):
        row = phy2log[layer].tolist()
        want = [0.0] * 6
        for p, e in enumerate(row):
            want[p // 4] += float(weight[layer, e]) / row.count(e)
        assert loads[layer].tolist() == pytest.approx(want, rel=1e-12)
    # Slot order within a GPU does not change a single bit.
    shuffled = phy2log.view(3, 6, 4).flip(-1).reshape(3, 24)
    assert torch.equal(metrics.gpu_loads(weight, shuffled, 6), loads)


def test_gpu_loads_errors():
    with pytest.raises(ValueError, match="num_gpus=4"):
        metrics.gpu_loads(torch.ones(3), torch.tensor([0, 1, 2, 0, 1, 2]), 4)
    with pytest.raises(ValueError, match="expert 5"):
        metrics.gpu_loads(torch.ones(3), torch.tensor([0, 5]), 1)
    with pytest.raises(ValueError, match="layers"):
        metrics.gpu_loads(torch.ones(2, 3), torch.tensor([[0, 1, 2]]), 1)


def test_balance_statistics_hand_case():
    loads = torch.tensor([[2.0, 4.0, 6.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    # mean 4, max 6, population variance 8/3
    assert metrics.balancedness(loads).tolist() == pytest.approx([4 / 6, 1.0, 1.0])
    cv = metrics.coefficient_of_variation(loads)
    assert cv.tolist() == pytest.approx([(8 / 3) ** 0.5 / 4, 0.0, 0.0])
    nv = metrics.normalized_variance(loads)
    assert nv.tolist() == pytest.approx([(8 / 3) / 16, 0.0, 0.0])
    assert metrics.balancedness(torch.tensor([1.0, 3.0])).item() == pytest.approx(2 / 3)


def test_count_duplicate_rows():
    phy2log = torch.tensor(
        [
            [0, 0, 1, 2, 3, 3],  # GPU 0 and GPU 1 both repeat (3 slots per GPU: [0,0,1] [2,3,3])
            [0, 1, 2, 0, 1, 2],  # no repeats
            [-1, -1, 1, 2, 2, 0],  # unused slots are not repeats; GPU 1 repeats 2
        ]
    )
    assert metrics.count_duplicate_rows(phy2log, 2) == 3
    assert metrics.count_duplicate_rows(phy2log[1], 2) == 0
    assert metrics.count_duplicate_rows(phy2log, 6) == 0
