"""Property tests (hypothesis) of every public eplb entry point.

Valid inputs must give valid outputs, checked against plain loops and the plain reference
(eplb/reference.py); invalid inputs must raise ValueError or TypeError (LayoutError is a
ValueError), never another exception and never hang: every call runs in a worker thread that must
finish within ``BUDGET_S``. Examples are derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import reference
from eplb.checks import MAX_SLOTS

BUDGET_S = 5.0
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_BAD = settings(FUZZ, max_examples=200)
LOAD_DTYPES = (torch.int32, torch.int64, torch.float16, torch.float32, torch.float64)


def call(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    """``fn(*args, **kwargs)`` in a worker thread; fails the test if it runs past BUDGET_S."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed back to the test below
            box["error"] = error

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(BUDGET_S)
    assert not worker.is_alive(), f"{fn.__name__} did not return within {BUDGET_S} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def rejects(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """The call raises ValueError or TypeError; any other exception fails the test."""
    with pytest.raises((ValueError, TypeError)):
        call(fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Strategies for valid inputs.


@st.composite
def hierarchical_sizes(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(experts, replicas, groups, nodes, gpus) for which the hierarchical policy applies."""
    nodes = draw(st.integers(1, 3))
    groups = nodes * draw(st.integers(1, 3))
    experts = groups * draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    least = -(-experts // gpus)
    replicas = gpus * draw(st.integers(least, least + 2))
    return experts, replicas, groups, nodes, gpus


@st.composite
def global_sizes(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """Sizes where ``num_nodes`` does not divide ``num_groups`` (global policy): neither the
    groups nor the GPUs need to fit the node count."""
    nodes = draw(st.integers(2, 5))
    groups = draw(st.integers(1, 8).filter(lambda g: g % nodes))
    experts = draw(st.integers(1, 12))
    gpus = draw(st.integers(1, 6))
    least = -(-experts // gpus)
    replicas = gpus * draw(st.integers(least, least + 2))
    return experts, replicas, groups, nodes, gpus


@st.composite
def load_tensors(draw: st.DrawFn, layers: int, experts: int) -> torch.Tensor:
    """[layers, experts] loads: small integers (many ties), zeros, or floats; several dtypes."""
    kind = draw(st.sampled_from(["ties", "zeros", "ints", "floats"]))
    size = layers * experts
    if kind == "zeros":
        values = [0] * size
    elif kind == "floats":
        value = st.floats(0, 1e6, allow_nan=False, allow_infinity=False, width=32)
        values = draw(st.lists(value, min_size=size, max_size=size))
    else:
        value = st.integers(0, 3 if kind == "ties" else 1000)
        values = draw(st.lists(value, min_size=size, max_size=size))
    # float16 holds the integers up to 2048 exactly, but not floats up to 1e6.
    dtype = draw(st.sampled_from(LOAD_DTYPES if kind != "floats" else LOAD_DTYPES[3:]))
    return torch.tensor(values, dtype=torch.float64).view(layers, experts).to(dtype)


@st.composite
def placements(
    draw: st.DrawFn, min_id: int = -1, one_d: bool = True
) -> tuple[torch.Tensor, int, int]:
    """(phy2log [L, R] or [R], num_logical E, num_gpus dividing R) with ids in [min_id, E)."""
    experts = draw(st.integers(1, 9))
    gpus = draw(st.integers(1, 4))
    slots = gpus * draw(st.integers(1, 4))
    layers = draw(st.integers(1, 3))
    ids = st.integers(min_id, experts - 1)
    flat = draw(st.lists(ids, min_size=layers * slots, max_size=layers * slots))
    phy2log = torch.tensor(flat, dtype=torch.int64).view(layers, slots)
    if one_d and layers == 1 and draw(st.booleans()):
        phy2log = phy2log[0]
    return phy2log, experts, gpus


# ---------------------------------------------------------------------------------------------
# Plain-loop oracles and checks.


def assert_valid_maps(
    phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, experts: int, slots: int
) -> None:
    """Shapes, dtypes, every expert placed, logcnt = copies, log2phy the inverse of phy2log."""
    layers = phy2log.shape[0]
    for t in (phy2log, log2phy, logcnt):
        assert t.dtype == torch.int64 and t.device.type == "cpu"
    assert phy2log.shape == (layers, slots) and logcnt.shape == (layers, experts)
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    for layer in range(layers):
        row = phy2log[layer].tolist()
        assert all(0 <= e < experts for e in row)
        for e in range(experts):
            where = [p for p, x in enumerate(row) if x == e]
            assert logcnt[layer, e] == len(where) >= 1
            copies = log2phy[layer, e].tolist()
            assert sorted(copies[: len(where)]) == where
            assert all(p == -1 for p in copies[len(where) :])
        assert int(logcnt[layer].sum()) == slots


def plain_gpu_loads(weight: list[list[float]], phy2log: list[list[int]], gpus: int) -> list:
    loads = []
    for w, row in zip(weight, phy2log, strict=True):
        per_gpu = len(row) // gpus
        count = [row.count(e) for e in range(len(w))]
        loads.append([0.0] * gpus)
        for p, e in enumerate(row):
            if e >= 0:
                loads[-1][p // per_gpu] += w[e] / count[e]
    return loads


# ---------------------------------------------------------------------------------------------
# Valid inputs.


@FUZZ
@given(st.data(), st.one_of(hierarchical_sizes(), global_sizes()))
def test_rebalance_deepseek_equals_plain_reference(data: st.DataObject, sizes: tuple) -> None:
    experts, replicas, groups, nodes, gpus = sizes
    layers = data.draw(st.integers(1, 3))
    weight = data.draw(load_tensors(layers, experts))
    got = call(eplb.rebalance_experts, weight, replicas, groups, nodes, gpus)
    assert len(got) == 3
    assert_valid_maps(*got, experts, replicas)
    want = reference.rebalance_experts(weight, replicas, groups, nodes, gpus)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    if groups % nodes:  # global policy: the node count plays no part, as in DeepSeek's code
        same = call(eplb.rebalance_experts, weight, replicas, 1, 1, gpus)
        assert all(torch.equal(a, b) for a, b in zip(got, same, strict=True))


@FUZZ
@given(st.data(), st.one_of(hierarchical_sizes(), global_sizes()), st.booleans())
def test_rebalance_balanced_is_valid_and_duplicate_free(
    data: st.DataObject, sizes: tuple, with_old: bool
) -> None:
    experts, replicas, groups, nodes, gpus = sizes
    layers = data.draw(st.integers(1, 3))
    weight = data.draw(load_tensors(layers, experts))
    old = None
    if with_old:
        ids = st.integers(-1, experts - 1)
        flat = data.draw(st.lists(ids, min_size=layers * replicas, max_size=layers * replicas))
        old = torch.tensor(flat).view(layers, replicas)
    used_nodes = nodes if groups % nodes == 0 else 1
    kwargs = {"policy": "balanced", "old_phy2log": old}
    if replicas // gpus > experts // used_nodes:  # some GPU would need an expert twice
        rejects(eplb.rebalance_experts, weight, replicas, groups, nodes, gpus, **kwargs)
        return
    got = call(eplb.rebalance_experts, weight, replicas, groups, nodes, gpus, **kwargs)
    assert len(got) == (3 if old is None else 4)
    phy2log, log2phy, logcnt = got[:3]
    assert_valid_maps(phy2log, log2phy, logcnt, experts, replicas)
    assert eplb.count_duplicate_rows(phy2log, gpus) == 0
    assert int(logcnt.max()) <= gpus // used_nodes  # copies capped at the GPUs of its node
    if old is not None:
        assert got[3].dtype == torch.int64
        assert got[3].tolist() == (phy2log != old).sum(1).tolist()


@FUZZ
@given(st.data(), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_balanced_packing_equals_plain_reference(
    data: st.DataObject, packs: int, per_pack: int, rows: int
) -> None:
    weight = data.draw(load_tensors(rows, packs * per_pack))
    pack, rank = call(eplb.balanced_packing, weight, packs)
    assert pack.shape == rank.shape == weight.shape
    assert pack.dtype == rank.dtype == torch.int64
    w32 = weight.float().numpy()
    for x in range(rows):
        want_pack, want_rank = reference.balanced_packing(list(w32[x]), packs)
        assert pack[x].tolist() == want_pack and rank[x].tolist() == want_rank
        for p in range(packs):  # exactly per_pack items, ranked 0 .. per_pack - 1
            assert sorted(rank[x][pack[x] == p].tolist()) == list(range(per_pack))


@FUZZ
@given(st.data(), st.integers(1, 8), st.integers(0, 8), st.integers(1, 3))
def test_replicate_experts_equals_plain_reference(
    data: st.DataObject, experts: int, extra: int, rows: int
) -> None:
    weight = data.draw(load_tensors(rows, experts))
    phy2log, rank, logcnt = call(eplb.replicate_experts, weight, experts + extra)
    assert phy2log.shape == rank.shape == (rows, experts + extra)
    assert logcnt.shape == (rows, experts)
    w32 = weight.float().numpy()
    for x in range(rows):
        want = reference.replicate_experts(list(w32[x]), experts + extra)
        assert (phy2log[x].tolist(), rank[x].tolist(), logcnt[x].tolist()) == want
        assert phy2log[x, :experts].tolist() == list(range(experts))
        assert int(logcnt[x].sum()) == experts + extra


@FUZZ
@given(st.data(), hierarchical_sizes())
def test_rebalance_hierarchical_equals_plain_reference(data: st.DataObject, sizes: tuple) -> None:
    experts, replicas, groups, nodes, gpus = sizes
    layers = data.draw(st.integers(1, 3))
    weight = data.draw(load_tensors(layers, experts))
    phy2log, phyrank, logcnt = call(
        eplb.rebalance_experts_hierarchical, weight, replicas, groups, nodes, gpus
    )
    w32 = weight.float().numpy()
    for layer in range(layers):
        want = reference.rebalance_layer(list(w32[layer]), replicas, groups, nodes, gpus)
        assert (phy2log[layer].tolist(), phyrank[layer].tolist(), logcnt[layer].tolist()) == want


@FUZZ
@given(st.data(), placements())
def test_phy2log_to_log2phy_inverts(data: st.DataObject, case: tuple) -> None:
    phy2log, experts, _ = case
    rows = phy2log.view(-1, phy2log.shape[-1]).tolist()
    top = max(max(r) for r in rows) + 1
    if top == 0:  # no expert at all: the expert count must be given
        rejects(eplb.phy2log_to_log2phy, phy2log)
        num_logical = experts
    else:
        num_logical = data.draw(st.sampled_from([None, top, experts + 2]))
    log2phy, logcnt = call(eplb.phy2log_to_log2phy, phy2log, num_logical)
    n = top if num_logical is None else num_logical
    if phy2log.dim() == 1:
        log2phy, logcnt = log2phy[None], logcnt[None]
    slots = [[[p for p, e in enumerate(row) if e == x] for x in range(n)] for row in rows]
    width = max(len(s) for layer in slots for s in layer)
    for layer, row_slots in enumerate(slots):
        assert logcnt[layer].tolist() == [len(s) for s in row_slots]
        assert log2phy[layer].tolist() == [s + [-1] * (width - len(s)) for s in row_slots]


@FUZZ
@given(st.data(), placements(one_d=False))
def test_log2phy_from_ranks_inverts_and_checks_its_ranks(data: st.DataObject, case: tuple) -> None:
    phy2log, experts, _ = case
    logcnt = eplb.phy2log_to_log2phy(phy2log, experts)[1]
    rank = torch.full_like(phy2log, data.draw(st.integers(-3, 3)))  # ignored on unused slots
    for layer, row in enumerate(phy2log.tolist()):
        for e in range(experts):
            slots = [p for p, x in enumerate(row) if x == e]
            for p, r in zip(slots, data.draw(st.permutations(range(len(slots)))), strict=True):
                rank[layer, p] = r
    log2phy = call(eplb.log2phy_from_ranks, phy2log, rank, logcnt)
    for layer, row in enumerate(phy2log.tolist()):
        for p, e in enumerate(row):
            if e >= 0:
                assert log2phy[layer, e, rank[layer, p]] == p
    assert int((log2phy >= 0).sum()) == int((phy2log >= 0).sum())

    # Break one thing: a repeated rank, a rank out of range, or a wrong count.
    used = (phy2log >= 0).nonzero().tolist()
    if not used:
        return
    layer, slot = data.draw(st.sampled_from(used))
    e = int(phy2log[layer, slot])
    fault = data.draw(st.sampled_from(["repeat", "range", "count"]))
    bad_rank, bad_cnt = rank.clone(), logcnt.clone()
    if fault == "repeat" and logcnt[layer, e] >= 2:
        other = next(p for p, x in enumerate(phy2log[layer].tolist()) if x == e and p != slot)
        bad_rank[layer, slot] = rank[layer, other]
    elif fault == "range":
        bad_rank[layer, slot] = data.draw(st.sampled_from([-1, int(logcnt[layer, e]), 10**6]))
    else:
        bad_cnt[layer, e] += data.draw(st.sampled_from([-1, 1]))
    rejects(eplb.log2phy_from_ranks, phy2log, bad_rank, bad_cnt)


@FUZZ
@given(st.data(), placements())
def test_gpu_loads_equals_plain_loops(data: st.DataObject, case: tuple) -> None:
    phy2log, experts, gpus = case
    rows = phy2log.view(-1, phy2log.shape[-1]).tolist()
    weight = data.draw(load_tensors(len(rows), experts))
    if phy2log.dim() == 1:
        weight = weight[0]
    loads = call(eplb.gpu_loads, weight, phy2log, gpus)
    assert loads.dtype == torch.float64 and loads.shape == (*phy2log.shape[:-1], gpus)
    want = plain_gpu_loads(weight.double().view(len(rows), -1).tolist(), rows, gpus)
    got = loads.view(len(rows), gpus).tolist()
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-300)


@st.composite
def gpu_load_rows(draw: st.DrawFn) -> list[list[float]]:
    """[layers, gpus] non-negative GPU loads, zeros and ties included."""
    gpus = draw(st.integers(1, 6))
    value = st.one_of(st.just(0.0), st.integers(0, 3).map(float), st.floats(0, 1e6))
    row = st.lists(value, min_size=gpus, max_size=gpus)
    return draw(st.lists(row, min_size=1, max_size=4))


@FUZZ
@given(gpu_load_rows())
def test_balance_statistics_equal_their_formulas(rows: list[list[float]]) -> None:
    loads = torch.tensor(rows, dtype=torch.float64)
    bal = call(eplb.balancedness, loads)
    cv = call(eplb.coefficient_of_variation, loads)
    nv = call(eplb.normalized_variance, loads)
    for layer, row in enumerate(rows):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))
        assert 0 <= bal[layer] <= 1
        assert bal[layer] == pytest.approx(mean / max(row) if max(row) > 0 else 1.0, rel=1e-12)
        assert cv[layer] == pytest.approx(std / mean if mean > 0 else 0.0, rel=1e-9, abs=1e-12)
        assert nv[layer] == pytest.approx(float(cv[layer]) ** 2, rel=1e-12, abs=1e-300)


@FUZZ
@given(placements())
def test_count_duplicate_rows_equals_plain_loops(case: tuple) -> None:
    phy2log, _, gpus = case
    rows = phy2log.view(-1, phy2log.shape[-1]).tolist()
    per_gpu = len(rows[0]) // gpus
    want = 0
    for row in rows:
        for g in range(gpus):
            ids = [e for e in row[g * per_gpu : (g + 1) * per_gpu] if e >= 0]
            want += len(ids) != len(set(ids))
    assert call(eplb.count_duplicate_rows, phy2log, gpus) == want


# ---------------------------------------------------------------------------------------------
# Invalid inputs: each replaces one argument of a valid call by a bad value.


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device="meta")


# Bad values for an argument that must be a positive int (any position).
BAD_INTS = [
    None,
    True,
    False,
    2.0,
    2.5,
    float("nan"),
    "4",
    [4],
    0,
    -1,
    -(10**8),
    torch.tensor(4.0),
    torch.tensor([4, 4]),
]
# Bad load statistics (weights of the algorithm and of gpu_loads, GPU loads of the statistics).
BAD_LOADS = [
    lambda: None,
    lambda: "weights",
    lambda: object(),
    lambda: [],
    lambda: [[]],
    lambda: [[1, 2], [3]],
    lambda: [["a", "b"]],
    lambda: torch.empty(0),
    lambda: torch.empty(2, 0),
    lambda: torch.rand(2, 8) > 0.5,
    lambda: torch.rand(2, 8, dtype=torch.complex64),
    lambda: _meta(2, 8),
    lambda: torch.full((2, 8), float("nan")),
    lambda: torch.tensor([[1.0] * 7 + [float("inf")]] * 2),
    lambda: torch.tensor([[1.0] * 7 + [-float("inf")]] * 2),
    lambda: torch.tensor([[1.0] * 7 + [-0.5]] * 2),
    lambda: torch.tensor([[1] * 7 + [-3]] * 2),
    lambda: np.array([[1.0] * 7 + [np.nan]] * 2),
]
# Bad placements for any function taking phy2log.
BAD_PHY2LOG = [
    lambda: None,
    lambda: "phy2log",
    lambda: 3.5,
    lambda: [[0.5, 1.0]],
    lambda: [[0, 1], [2]],
    lambda: torch.zeros(2, 8),
    lambda: torch.zeros(2, 8, dtype=torch.bool),
    lambda: torch.zeros(2, 8, dtype=torch.complex64),
    lambda: torch.tensor(3),
    lambda: torch.zeros(0, dtype=torch.int64),
    lambda: torch.zeros(2, 0, dtype=torch.int64),
    lambda: torch.zeros(2, 2, 8, dtype=torch.int64),
    lambda: _meta(2, 8, dtype=torch.int64),
    lambda: torch.tensor([[0, 1, 2, 3, 4, 5, 6, -2]] * 2),
    lambda: torch.zeros(2, 8, dtype=torch.uint64),
]


def _fresh(value: object) -> object:
    return value() if callable(value) and not isinstance(value, torch.Tensor) else value


W = torch.tensor([[3.0, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
# (E=8) 12 slots, 4 groups, 2 nodes, 6 GPUs: hierarchical; every size rule holds.
SIZES = (12, 4, 2, 6)
# Per position of rebalance_experts's sizes: bad values beyond BAD_INTS.
BAD_SIZES = {
    0: [10**8, 2**64, MAX_SLOTS + 6, 13, 6],  # replicas: huge, not a multiple of GPUs, below E
    1: [10**8, 3 * 2**40],  # groups: not dividing the experts
    2: [4],  # nodes: divide the groups but not the GPUs
    3: [10**8, 5, 3],  # GPUs: not dividing the replicas, not a multiple of the nodes
}


@FUZZ_BAD
@given(st.sampled_from([*BAD_LOADS, lambda: torch.rand(8), lambda: torch.rand(2, 2, 8)]))
def test_rebalance_rejects_bad_weight(bad: Callable[[], object]) -> None:
    for policy in eplb.POLICIES:
        rejects(eplb.rebalance_experts, _fresh(bad), *SIZES, policy=policy)
    rejects(eplb.rebalance_experts_hierarchical, _fresh(bad), *SIZES)
    rejects(eplb.balanced_packing, _fresh(bad), 2)
    rejects(eplb.replicate_experts, _fresh(bad), 12)


def test_rebalance_rejects_loads_beyond_float32() -> None:
    # Each load fits float32 but a layer's sum does not; the algorithm sums in float32.
    huge = torch.full((1, 8), 1e38, dtype=torch.float64)
    rejects(eplb.rebalance_experts, huge, 8, 1, 1, 2)
    rejects(eplb.rebalance_experts, huge * 10, 8, 1, 1, 2)  # beyond float32 on its own
    ok = call(eplb.rebalance_experts, huge / 8, 8, 1, 1, 2)
    assert ok[2].tolist() == [[1] * 8]


@FUZZ_BAD
@given(st.data(), st.integers(0, 3), st.sampled_from(eplb.POLICIES))
def test_rebalance_rejects_bad_sizes(data: st.DataObject, position: int, policy: str) -> None:
    bad = data.draw(st.sampled_from([*BAD_INTS, *BAD_SIZES[position]]))
    sizes = list(SIZES)
    sizes[position] = bad
    rejects(eplb.rebalance_experts, W, *sizes, policy=policy)
    rejects(eplb.rebalance_experts_hierarchical, W, *sizes)


@FUZZ_BAD
@given(st.sampled_from([*BAD_INTS, 10**8, 3, 5, 16]), st.sampled_from([*BAD_INTS, 10**8, 7, 2]))
def test_module_helpers_reject_bad_sizes(packs: object, slots: object) -> None:
    rejects(eplb.balanced_packing, W, packs)  # 8 items: 3, 5 and 16 packs do not divide them
    rejects(eplb.replicate_experts, W, slots)  # fewer than 8 slots, or far too many


@FUZZ_BAD
@given(st.sampled_from([None, "", "DeepSeek", "balanced ", 1, ["balanced"], b"balanced"]))
def test_rebalance_rejects_bad_policy(policy: object) -> None:
    rejects(eplb.rebalance_experts, W, *SIZES, policy=policy)


@FUZZ_BAD
@given(
    st.sampled_from(
        [
            *BAD_PHY2LOG[1:],  # not None: the default, no old placement
            lambda: torch.zeros(2, 11, dtype=torch.int64),  # wrong shape
            lambda: torch.zeros(1, 12, dtype=torch.int64),
            lambda: torch.full((2, 12), 8),  # ids >= E
            lambda: torch.full((2, 12), 2**62),
            lambda: torch.full((2, 12), -2),
        ]
    )
)
def test_rebalance_rejects_bad_old_placement(bad: Callable[[], object]) -> None:
    rejects(eplb.rebalance_experts, W, *SIZES, policy="balanced", old_phy2log=_fresh(bad))
    # A valid old placement is still an error with the DeepSeek policy.
    valid = torch.arange(12).remainder(8).repeat(2, 1)
    rejects(eplb.rebalance_experts, W, *SIZES, old_phy2log=valid)


@FUZZ_BAD
@given(
    st.sampled_from([*BAD_PHY2LOG, lambda: torch.full((2, 8), 10**12)]),
    st.sampled_from([*BAD_INTS, 10**8, 10**12, 1]),
)
def test_maps_reject_bad_arguments(bad: Callable[[], object], num_logical: object) -> None:
    rejects(eplb.phy2log_to_log2phy, _fresh(bad))
    rejects(eplb.phy2log_to_log2phy, _fresh(bad), 9)
    valid = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * 2)
    if num_logical is not None:  # None is the default: E = max + 1
        rejects(eplb.phy2log_to_log2phy, valid, num_logical)  # 1: below the ids held
    rejects(eplb.phy2log_to_log2phy, torch.full((2, 8), -1))  # no expert: E unknown
    ranks, counts = torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64)
    rejects(eplb.log2phy_from_ranks, _fresh(bad), ranks, counts)
    rejects(eplb.log2phy_from_ranks, valid, _fresh(bad), counts)
    rejects(eplb.log2phy_from_ranks, valid, ranks, _fresh(bad))


@FUZZ_BAD
@given(
    st.sampled_from(
        [
            (torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), torch.tensor([[2]])),  # same copy
            (torch.tensor([[0, 0]]), torch.tensor([[0, 2]]), torch.tensor([[2]])),  # rank 2 of 2
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.tensor([[3]])),  # count
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.tensor([[-2]])),
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.tensor([[10**10]])),
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.tensor([2])),  # 1-D logcnt
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.zeros(1, 0, dtype=torch.int64)),
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.ones(1, MAX_SLOTS + 1)),
            (torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), torch.tensor([[1]])),  # id >= E
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1, 2]]), torch.tensor([[2]])),  # shapes
            (torch.tensor([[0, 0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2]])),
            (torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), torch.tensor([[2.0]])),
            (torch.tensor([[-1, -1]]), torch.tensor([[0, 0]]), torch.tensor([[1]])),  # count
        ]
    )
)
def test_log2phy_from_ranks_rejects_inconsistent_ranks(case: tuple) -> None:
    rejects(eplb.log2phy_from_ranks, *case)


@FUZZ_BAD
@given(
    st.sampled_from(
        [*BAD_LOADS, lambda: torch.rand(2, 2, 8), lambda: torch.rand(8), lambda: torch.rand(3, 8)]
    ),
    st.sampled_from(BAD_PHY2LOG),
    st.sampled_from([lambda: torch.full((2, 8), 8), lambda: torch.tensor([0, 1, 2, 3])]),
    st.sampled_from([*BAD_INTS, 10**8, 3, 16]),
)
def test_metrics_reject_bad_arguments(
    weight: Callable[[], object],
    phy2log: Callable[[], object],
    mismatched: Callable[[], object],
    gpus: object,
) -> None:
    valid_w, valid_p = torch.rand(2, 8), torch.arange(8).repeat(2, 1)
    assert call(eplb.gpu_loads, valid_w, valid_p, 2).shape == (2, 2)
    rejects(eplb.gpu_loads, _fresh(weight), valid_p, 2)
    rejects(eplb.gpu_loads, valid_w, _fresh(phy2log), 2)
    rejects(eplb.gpu_loads, valid_w, _fresh(mismatched), 2)  # ids >= E, or layers differ
    rejects(eplb.gpu_loads, valid_w, valid_p, gpus)
    rejects(eplb.count_duplicate_rows, _fresh(phy2log), 2)
    rejects(eplb.count_duplicate_rows, valid_p, gpus)
    for statistic in (eplb.balancedness, eplb.coefficient_of_variation, eplb.normalized_variance):
        if weight in BAD_LOADS:  # the others are valid [..., num_gpus] GPU loads
            rejects(statistic, _fresh(weight))
        rejects(statistic, torch.tensor(4.0))  # 0-d: no GPU axis


def test_the_valid_calls_the_invalid_ones_are_made_from_work() -> None:
    for policy in eplb.POLICIES:
        assert_valid_maps(*call(eplb.rebalance_experts, W, *SIZES, policy=policy), 8, 12)
    assert len(call(eplb.rebalance_experts_hierarchical, W, *SIZES)) == 3
    assert len(call(eplb.balanced_packing, W, 2)) == 2
    assert len(call(eplb.replicate_experts, W, 12)) == 3


def test_hierarchical_helper_and_global_policy_differ_on_node_rules() -> None:
    # num_nodes does not divide num_groups: the helper (DeepSeek's assert) rejects it, while
    # rebalance_experts falls back to the global policy, whatever the GPU count.
    rejects(eplb.rebalance_experts_hierarchical, W, 12, 4, 3, 6)
    assert len(call(eplb.rebalance_experts, W, 12, 4, 3, 4)) == 3
