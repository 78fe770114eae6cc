"""eplb.mapfile and eplb.fileio: round trips, every malformed-file case, SGLang interop, and the
atomic write under kill -9."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import eplb
from eplb import fileio

# A valid 2-layer map on 2 devices, 3 slots each, experts 0..4, written by hand.
HAND_MAP_TEXT = """
{
    "moe_layer_count": 2,
    "layer_list": [
        {"layer_id": 1, "device_count": 2,
         "device_list": [{"device_id": 1, "device_expert": [4, 0, 2]},
                         {"device_id": 0, "device_expert": [3, 1, 0]}]},
        {"layer_id": 0, "device_count": 2,
         "device_list": [{"device_id": 0, "device_expert": [0, 1, 2]},
                         {"device_id": 1, "device_expert": [3, 4, 2]}]}
    ]
}
"""
HAND_PHY2LOG = [[0, 1, 2, 3, 4, 2], [3, 1, 0, 4, 0, 2]]


def _write(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _balanced_map(num_layers: int, num_experts: int, num_replicas: int, num_gpus: int, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 1000, (num_layers, num_experts), generator=gen)
    return eplb.rebalance_experts(weight, num_replicas, 1, 1, num_gpus, policy="balanced")[0]


# ------------------------------------------------------------------------------ MindSpeed map


def test_hand_written_map_parses_in_layer_and_device_order(tmp_path):
    path = _write(tmp_path / "map.json", HAND_MAP_TEXT)
    phy2log = eplb.load_expert_map(path)
    assert phy2log.dtype == torch.int64
    assert phy2log.tolist() == HAND_PHY2LOG
    assert eplb.load_map(path)[1] == 2
    assert eplb.detect_format(path) == "mindspeed-map"


@pytest.mark.parametrize(
    ("layers", "experts", "replicas", "gpus"),
    [(3, 16, 24, 8), (1, 8, 12, 4), (2, 1, 4, 4), (2, 6, 6, 1), (1, 1, 1, 1), (4, 12, 16, 2)],
)
def test_map_round_trip(tmp_path, layers, experts, replicas, gpus):
    phy2log = _balanced_map(layers, experts, replicas, gpus, seed=layers + experts)
    path = eplb.save_expert_map(tmp_path / "map.json", phy2log, gpus)
    assert path == tmp_path / "map.json"
    loaded, num_gpus = eplb.load_map(path)
    assert torch.equal(eplb.load_expert_map(path), phy2log)
    assert torch.equal(loaded, phy2log) and num_gpus == gpus
    doc = json.loads(path.read_text())
    # The documented structure, checked field by field against the placement.
    assert doc["moe_layer_count"] == layers
    per = replicas // gpus
    for layer, entry in enumerate(doc["layer_list"]):
        assert entry["layer_id"] == layer and entry["device_count"] == gpus
        for g, device in enumerate(entry["device_list"]):
            assert device == {
                "device_id": g,
                "device_expert": phy2log[layer, g * per : (g + 1) * per].tolist(),
            }


def test_one_dimensional_phy2log_is_one_layer(tmp_path):
    eplb.save_expert_map(tmp_path / "m.json", torch.tensor([1, 0, 2, 0]), 2)
    assert eplb.load_expert_map(tmp_path / "m.json").tolist() == [[1, 0, 2, 0]]


def _valid_doc() -> dict[str, Any]:
    return json.loads(HAND_MAP_TEXT)


def _set(path: tuple, value: Any):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return doc

    return mutate


def _drop(path: tuple):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return doc

    return mutate


L0, L1 = 1, 0  # positions in layer_list of layer ids 0 and 1 in HAND_MAP_TEXT
MALFORMED_MAPS = [
    ("not an object", lambda d: [d], r"must be a JSON object, got list"),
    ("no count", _drop(("moe_layer_count",)), r"lacks key 'moe_layer_count'"),
    ("no list", _drop(("layer_list",)), r"lacks key 'layer_list'"),
    ("count str", _set(("moe_layer_count",), "2"), r"moe_layer_count must be .*got '2'"),
    ("count bool", _set(("moe_layer_count",), True), r"moe_layer_count must be .*got True"),
    ("list dict", _set(("layer_list",), {}), r"layer_list must be a list, got dict"),
    ("count mismatch", _set(("moe_layer_count",), 3), r"moe_layer_count is 3 but .* 2 layers"),
    ("no layers", lambda d: {"moe_layer_count": 0, "layer_list": []}, r"holds no layers"),
    ("layer not dict", _set(("layer_list", 0), [1]), r"layer_list\[0\] must be an object"),
    ("no layer_id", _drop(("layer_list", 0, "layer_id")), r"layer_list\[0\] lacks key 'layer_id'"),
    (
        "no device_count",
        _drop(("layer_list", 0, "device_count")),
        r"layer_list\[0\] lacks key 'device_count'",
    ),
    (
        "no device_list",
        _drop(("layer_list", 0, "device_list")),
        r"layer_list\[0\] lacks key 'device_list'",
    ),
    ("layer_id range", _set(("layer_list", 0, "layer_id"), 2), r"layer_id 2 is not one of 0\.\.1"),
    ("layer_id float", _set(("layer_list", 0, "layer_id"), 1.0), r"layer_id 1\.0 is not one of"),
    ("layer_id twice", _set(("layer_list", 0, "layer_id"), 0), r"layer 0 appears twice"),
    (
        "device_count zero",
        _set(("layer_list", L0, "device_count"), 0),
        r"layer 0: device_count must be a positive integer, got 0",
    ),
    (
        "device_count mismatch",
        _set(("layer_list", L0, "device_count"), 3),
        r"layer 0: device_count is 3 but device_list holds 2 devices",
    ),
    (
        "device_list not list",
        _set(("layer_list", L0, "device_list"), "x"),
        r"layer 0: device_list must be a list, got str",
    ),
    (
        "device not dict",
        _set(("layer_list", L0, "device_list", 1), 5),
        r"layer 0, device_list\[1\] must be an object, got int",
    ),
    (
        "no device_id",
        _drop(("layer_list", L0, "device_list", 1, "device_id")),
        r"layer 0, device_list\[1\] lacks key 'device_id'",
    ),
    (
        "no device_expert",
        _drop(("layer_list", L0, "device_list", 1, "device_expert")),
        r"layer 0, device_list\[1\] lacks key 'device_expert'",
    ),
    (
        "device id out of range",
        _set(("layer_list", L0, "device_list", 1, "device_id"), 2),
        r"layer 0, device_list\[1\]: device_id 2 is not one of 0\.\.1",
    ),
    (
        "device id negative",
        _set(("layer_list", L0, "device_list", 1, "device_id"), -1),
        r"layer 0, device_list\[1\]: device_id -1 is not one of 0\.\.1",
    ),
    (
        "device id str",
        _set(("layer_list", L0, "device_list", 1, "device_id"), "1"),
        r"layer 0, device_list\[1\]: device_id '1' is not one of",
    ),
    (
        "device id twice",
        _set(("layer_list", L0, "device_list", 1, "device_id"), 0),
        r"layer 0: device_id 0 appears twice",
    ),
    (
        "experts not list",
        _set(("layer_list", L0, "device_list", 1, "device_expert"), 3),
        r"layer 0, device 1: device_expert must be a list, got int",
    ),
    (
        "expert negative",
        _set(("layer_list", L0, "device_list", 1, "device_expert"), [3, -1, 2]),
        r"layer 0, device 1: expert id -1 is not a non-negative integer",
    ),
    (
        "expert float",
        _set(("layer_list", L0, "device_list", 1, "device_expert"), [3, 4.0, 2]),
        r"layer 0, device 1: expert id 4\.0 is not",
    ),
    (
        "expert bool",
        _set(("layer_list", L0, "device_list", 1, "device_expert"), [3, True, 2]),
        r"layer 0, device 1: expert id True is not",
    ),
    (
        "expert twice on a device",
        _set(("layer_list", L1, "device_list", 0, "device_expert"), [4, 2, 4]),
        r"layer 1, device 1: expert 4 appears twice",
    ),
    (
        "unequal experts per device",
        _set(("layer_list", L1, "device_list", 1, "device_expert"), [3, 1]),
        r"layer 1, device 0: holds 2 experts but layer 0, device 0 holds 3",
    ),
    (
        "unequal experts across layers",
        lambda d: _set(("layer_list", L1, "device_list", 1, "device_expert"), [3, 1, 0, 4])(
            _set(("layer_list", L1, "device_list", 0, "device_expert"), [4, 0, 2, 1])(d)
        ),
        r"layer 1, device 0: holds 4 experts but layer 0, device 0 holds 3",
    ),
    (
        "device_count differs across layers",
        lambda d: {
            **d,
            "layer_list": [
                {
                    "layer_id": 1,
                    "device_count": 1,
                    "device_list": [{"device_id": 0, "device_expert": [0, 1, 2, 3, 4, 5]}],
                },
                d["layer_list"][L0],
            ],
        },
        r"layer 1: device_count 1 differs from layer 0's 2",
    ),
    (
        "expert missing from a layer",
        _set(("layer_list", L1, "device_list", 0, "device_expert"), [4, 0, 1]),
        r"layer 1: expert 2 is on no device \(every layer must hold each of the experts 0\.\.4\)",
    ),
    (
        "expert id too large",
        _set(("layer_list", L0, "device_list", 1, "device_expert"), [3, 4, 10**12]),
        r"layer 0, device 1: expert id 1000000000000 is too large",
    ),
    (
        "no experts on devices",
        lambda d: {
            "moe_layer_count": 1,
            "layer_list": [
                {
                    "layer_id": 0,
                    "device_count": 1,
                    "device_list": [{"device_id": 0, "device_expert": []}],
                }
            ],
        },
        r"layer 0, device 0: holds no experts",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(m, msg, id=name) for name, m, msg in MALFORMED_MAPS],
)
def test_malformed_map_is_a_value_error_naming_the_fault(tmp_path, mutate, message):
    path = _write(tmp_path / "bad.json", mutate(_valid_doc()))
    with pytest.raises(ValueError, match=message) as info:
        eplb.load_expert_map(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ValueError, match=message):
        eplb.parse_expert_map(mutate(_valid_doc()))


def test_design_example_map_lacks_expert_four(tmp_path):
    # The illustrative map of the MindSpeed-RL workflow skips expert 4: not a valid placement.
    doc = {
        "moe_layer_count": 1,
        "layer_list": [
            {
                "layer_id": 0,
                "device_count": 2,
                "device_list": [
                    {"device_id": 0, "device_expert": [0, 1, 2, 3, 5]},
                    {"device_id": 1, "device_expert": [5, 6, 7, 8, 1]},
                ],
            }
        ],
    }
    with pytest.raises(ValueError, match="layer 0: expert 4 is on no device"):
        eplb.load_expert_map(_write(tmp_path / "m.json", doc))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"moe_layer_count": 1, "layer_list": [', "not valid JSON"),
        ('{"moe_layer_count": 1, "moe_layer_count": 1, "layer_list": []}', "appears twice"),
        (b"\xff\xfe{", "not valid JSON|codec"),
    ],
)
def test_unreadable_map_text(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        eplb.load_expert_map(path)


def test_missing_map_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        eplb.load_expert_map(tmp_path / "absent.json")


def test_save_expert_map_refuses_what_load_would_refuse(tmp_path):
    target = tmp_path / "m.json"
    with pytest.raises(ValueError, match="layer 0, device 0: expert 1 appears twice"):
        eplb.save_expert_map(target, torch.tensor([[1, 1, 0, 2]]), 2)
    with pytest.raises(ValueError, match="layer 1: expert 2 is on no device"):
        eplb.save_expert_map(target, torch.tensor([[0, 1, 2, 0], [0, 1, 0, 1]]), 2)
    with pytest.raises(ValueError, match="expert id -1"):
        eplb.save_expert_map(target, torch.tensor([[0, 1, -1, 2]]), 2)
    with pytest.raises(eplb.LayoutError, match="num_gpus=3 does not divide the 4 slots"):
        eplb.save_expert_map(target, torch.tensor([[0, 1, 2, 3]]), 3)
    with pytest.raises(ValueError, match=r"non-empty|at least one layer"):
        eplb.save_expert_map(target, torch.zeros(0, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="num_gpus"):
        eplb.save_expert_map(target, torch.tensor([[0, 1]]), 2.0)
    with pytest.raises(TypeError, match="dtype"):
        eplb.save_expert_map(target, torch.tensor([[0.0, 1.0]]), 2)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


# -------------------------------------------------------------------------- token statistics


SEED_STATS_TEXT = """
{
  "0": {"0": 123, "1": 256, "2": 89},
  "1": {"0": 88, "1": 190}
}
"""


def test_hand_written_statistics(tmp_path):
    path = _write(tmp_path / "token_collects_all.json", SEED_STATS_TEXT)
    counts = eplb.load_token_stats(path)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[123, 256, 89], [88, 190, 0]]  # an absent expert counts 0
    assert eplb.load_token_stats(tmp_path).tolist() == counts.tolist()  # the folder works too
    assert eplb.load_token_stats(path, num_experts=5).tolist() == [
        [123, 256, 89, 0, 0],
        [88, 190, 0, 0, 0],
    ]
    assert eplb.detect_format(tmp_path) == "mindspeed-stats"
    assert torch.equal(eplb.load_stats(tmp_path), counts)


@pytest.mark.parametrize("shape", [(3, 16), (1, 1), (1, 7), (5, 1), (0, 4), (2, 0)])
def test_statistics_round_trip(tmp_path, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    counts = torch.randint(0, 3, shape, generator=gen) * torch.randint(0, 10**12, shape)
    path = eplb.save_token_stats(tmp_path / "s.json", counts)
    doc = json.loads(path.read_text())
    assert doc == {
        str(layer): {str(e): int(counts[layer, e]) for e in range(shape[1])}
        for layer in range(shape[0])
    }
    loaded = eplb.load_token_stats(path, num_experts=shape[1] or None)
    if shape[1]:
        assert torch.equal(loaded, counts)
    else:
        assert loaded.shape == (shape[0], 0)


def test_empty_statistics(tmp_path):
    path = _write(tmp_path / "s.json", "{}")
    assert eplb.load_token_stats(path).shape == (0, 0)
    assert eplb.load_token_stats(path, num_experts=4).shape == (0, 4)
    zeros = eplb.load_token_stats(_write(tmp_path / "z.json", {"0": {}, "1": {}}))
    assert zeros.shape == (2, 0)


def test_save_token_stats_accepts_lists_and_rejects_bad_counts(tmp_path):
    eplb.save_token_stats(tmp_path / "a.json", [[1, 2], [3, 4]])
    assert eplb.load_token_stats(tmp_path / "a.json").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="-3 tokens for layer 1, expert 0"):
        eplb.save_token_stats(tmp_path / "b.json", torch.tensor([[1, 2], [-3, 4]]))
    with pytest.raises(TypeError, match="dtype"):
        eplb.save_token_stats(tmp_path / "b.json", torch.tensor([[1.5]]))
    with pytest.raises(ValueError, match="2-D"):
        eplb.save_token_stats(tmp_path / "b.json", torch.tensor([1, 2]))
    assert not (tmp_path / "b.json").exists()


MALFORMED_STATS = [
    ("not object", [1, 2], r"must be a JSON object \{layer: \{expert: tokens\}\}, got list"),
    ("layer key", {"a": {}}, r"layer key 'a' is not a non-negative integer"),
    ("negative layer", {"-1": {}}, r"layer key '-1' is not"),
    ("layer gap", {"0": {}, "2": {}}, r"layer 1 is missing: layers must be numbered 0\.\.1"),
    ("layer twice", {"0": {}, "00": {}}, r"layer 0 appears twice"),
    ("layer list", {"0": [1, 2]}, r"layer 0: expected an object \{expert: tokens\}, got list"),
    ("expert key", {"0": {"x": 1}}, r"layer 0: expert key 'x' is not"),
    ("expert twice", {"0": {"1": 1, "01": 2}}, r"layer 0: expert 1 appears twice"),
    ("negative count", {"0": {"1": -4}}, r"layer 0, expert 1: token count -4 is not"),
    ("float count", {"0": {"1": 2.5}}, r"layer 0, expert 1: token count 2\.5 is not"),
    ("bool count", {"0": {"1": True}}, r"layer 0, expert 1: token count True is not"),
    ("str count", {"0": {"1": "7"}}, r"layer 0, expert 1: token count '7' is not"),
    ("huge count", {"0": {"1": 2**63}}, r"layer 0, expert 1: token count 9223372036854775808"),
    ("huge expert", {"0": {str(2**40): 1}}, r"layer 0: expert id 1099511627776 is not below"),
]


@pytest.mark.parametrize(
    ("doc", "message"), [pytest.param(d, m, id=name) for name, d, m in MALFORMED_STATS]
)
def test_malformed_statistics(tmp_path, doc, message):
    path = _write(tmp_path / "s.json", doc)
    with pytest.raises(ValueError, match=message) as info:
        eplb.load_token_stats(path)
    assert str(info.value).startswith(f"{path}: ")


def test_statistics_expert_outside_num_experts(tmp_path):
    path = _write(tmp_path / "s.json", {"0": {"3": 1}})
    with pytest.raises(ValueError, match="layer 0: expert id 3 is not below 3"):
        eplb.load_token_stats(path, num_experts=3)
    with pytest.raises(ValueError, match="key '0' appears twice"):
        eplb.load_token_stats(_write(tmp_path / "d.json", '{"0": {}, "0": {}}'))


# ------------------------------------------------------------------------------------ SGLang


def test_sglang_pt_dump_is_summed_over_steps(tmp_path):
    gen = torch.Generator().manual_seed(3)
    per_step = torch.randint(0, 50, (7, 4, 10), generator=gen, dtype=torch.int32)
    # What SGLang's stat recorder writes: a dict with the rank, logical_count [steps, L, E] and
    # the utilization rate (None unless enabled).
    dump = {"rank": 0, "logical_count": per_step, "average_utilization_rate_over_window": None}
    torch.save(dump, tmp_path / "expert_distribution_recorder_1.pt")
    counts = eplb.load_sglang_stats(tmp_path / "expert_distribution_recorder_1.pt")
    want = [[sum(int(per_step[s, la, e]) for s in range(7)) for e in range(10)] for la in range(4)]
    assert counts.dtype == torch.int64 and counts.tolist() == want
    assert eplb.detect_format(tmp_path / "expert_distribution_recorder_1.pt") == "sglang-stats"
    assert torch.equal(eplb.load_stats(tmp_path / "expert_distribution_recorder_1.pt"), counts)


def test_sglang_json_stats_any_leading_axes(tmp_path):
    two_d = [[1, 2, 3], [4, 5, 6]]
    assert eplb.load_sglang_stats(
        _write(tmp_path / "a.json", {"logical_count": two_d})
    ).tolist() == (two_d)
    four_d = torch.arange(2 * 3 * 2 * 3).reshape(2, 3, 2, 3)
    path = _write(tmp_path / "b.json", {"logical_count": four_d.tolist(), "rank": 0})
    assert eplb.load_sglang_stats(path).tolist() == four_d.sum((0, 1)).tolist()
    floats = _write(tmp_path / "c.json", {"logical_count": [[1.0, 2.0]]})
    assert eplb.load_sglang_stats(floats).tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"counts": [[1]]}, "must hold the key 'logical_count'"),
        ({"logical_count": [1, 2]}, r"shape \[\.\.\., layers, experts\], got \(2,\)"),
        ({"logical_count": [[1, 2], [3]]}, "not a rectangular array"),
        ({"logical_count": [[1, -2]]}, "negative count for layer 0, expert 1: -2"),
        ({"logical_count": [[1.5, 2]]}, "whole token counts"),
        ({"logical_count": [[True, False]]}, "dtype torch.bool"),
        ({"logical_count": "x"}, "not a rectangular array|shape"),
    ],
)
def test_malformed_sglang_stats(tmp_path, doc, message):
    with pytest.raises(ValueError, match=message):
        eplb.load_sglang_stats(_write(tmp_path / "s.json", doc))


class _Opaque:
    pass


def test_sglang_pt_that_is_not_plain_data_is_refused(tmp_path):
    torch.save({"logical_count": _Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable torch file"):
        eplb.load_sglang_stats(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable torch file"):
        eplb.load_stats(tmp_path / "junk.pt")
    torch.save(torch.zeros(2, 2), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="expected a JSON object"):
        eplb.load_stats(tmp_path / "bare.pt")


def _sglang_style_load(path: Path) -> torch.Tensor:
    """What SGLang does with --init-expert-location FILE.json: json.loads, then passes the keys
    on as keyword arguments, then builds logical -> all physical slots with plain loops."""
    data = json.loads(Path(path).read_text())
    assert "physical_to_logical_map" in data

    def init_by_mapping(physical_to_logical_map):  # SGLang's signature: no other key accepted
        return torch.tensor(physical_to_logical_map)

    p = init_by_mapping(**data)
    num_logical = int(p.max()) + 1
    for row in p.tolist():
        slots = [[] for _ in range(num_logical)]
        for phys, logical in enumerate(row):
            slots[logical].append(phys)
        assert all(slots), "every logical expert needs a physical slot"
    return p


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_map_round_trip(tmp_path, suffix):
    phy2log = _balanced_map(3, 16, 20, 4, seed=5)
    path = eplb.save_sglang_map(tmp_path / f"init{suffix}", phy2log)
    assert torch.equal(eplb.load_sglang_map(path), phy2log)
    assert eplb.load_map(path)[1] is None
    assert eplb.detect_format(path) == "sglang-map"
    if suffix == ".json":
        assert json.loads(path.read_text()) == {"physical_to_logical_map": phy2log.tolist()}
        assert torch.equal(_sglang_style_load(path), phy2log)
    else:
        data = torch.load(path, weights_only=True)
        assert list(data) == ["physical_to_logical_map"]
        assert torch.equal(data["physical_to_logical_map"], phy2log)


def test_sglang_map_keeps_repeats_on_a_device(tmp_path):
    # SGLang's format has no device count, so a DeepSeek-policy map with repeats is kept as is.
    phy2log = torch.tensor([[0, 0, 1, 2]])
    eplb.save_sglang_map(tmp_path / "m.json", phy2log)
    assert eplb.load_sglang_map(tmp_path / "m.json").tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[0, 1, -1]], r"layer 0, slot 2: expert id -1 is negative"),
        ([[0, 1, 2], [0, 5, 1]], r"layer 1, slot 1: expert id 5 is too large"),
        ([[0, 1, 2], [0, 1, 1]], r"layer 1: expert 2 is on no slot"),
        ([[0.0, 1.0]], "must hold integer expert ids"),
        ([[0, 1], [0]], "not a rectangular"),
        ([0, 1], r"non-empty \[layers\]\[slots\] array, got shape \(2,\)"),
        ([], r"got shape \(0,\)"),
    ],
)
def test_malformed_sglang_map(tmp_path, value, message):
    path = _write(tmp_path / "m.json", {"physical_to_logical_map": value})
    with pytest.raises(ValueError, match=message):
        eplb.load_sglang_map(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[0, 1, -1]], r"layer 0, slot 2: expert id -1 is negative"),
        ([[0, 1, 2], [0, 5, 1]], r"layer 1, slot 1: expert id 5 is too large"),
        ([[0, 1, 2], [0, 1, 1]], r"layer 1: expert 2 is on no slot"),
    ],
)
def test_save_sglang_map_refuses_what_load_would_refuse(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        eplb.save_sglang_map(tmp_path / "m.json", torch.tensor(rows))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- conversion


def test_convert_maps_both_ways(tmp_path):
    phy2log = _balanced_map(2, 8, 12, 4, seed=9)
    mind = eplb.save_expert_map(tmp_path / "m.json", phy2log, 4)
    assert eplb.convert_file(mind, tmp_path / "s.json") == "sglang-map"
    assert torch.equal(eplb.load_sglang_map(tmp_path / "s.json"), phy2log)
    with pytest.raises(ValueError, match=r"needs? num_gpus|give num_gpus"):
        eplb.convert_file(tmp_path / "s.json", tmp_path / "back.json")
    assert eplb.convert_file(tmp_path / "s.json", tmp_path / "back.json", num_gpus=4) == (
        "mindspeed-map"
    )
    assert (tmp_path / "back.json").read_bytes() == mind.read_bytes()
    with pytest.raises(ValueError, match=r"num_gpus=2 but .* has 4 devices"):
        eplb.convert_file(mind, tmp_path / "x.json", to="mindspeed", num_gpus=2)
    with pytest.raises(ValueError, match="to must be one of"):
        eplb.convert_file(mind, tmp_path / "x.json", to="vllm")


def test_convert_statistics_both_ways(tmp_path):
    counts = torch.tensor([[5, 0, 7], [1, 2, 3]])
    eplb.save_token_stats(tmp_path / "token_collects_all.json", counts)
    assert eplb.convert_file(tmp_path, tmp_path / "sg.json") == "sglang-stats"
    assert json.loads((tmp_path / "sg.json").read_text()) == {"logical_count": counts.tolist()}
    assert eplb.convert_file(tmp_path / "sg.json", tmp_path / "ms.json") == "mindspeed-stats"
    assert (tmp_path / "ms.json").read_bytes() == (
        tmp_path / "token_collects_all.json"
    ).read_bytes()
    with pytest.raises(ValueError, match="no layers"):
        eplb.save_sglang_stats(tmp_path / "e.json", torch.zeros(0, 3, dtype=torch.int64))


def test_loaders_refuse_the_other_kind(tmp_path):
    eplb.save_expert_map(tmp_path / "m.json", torch.tensor([[0, 1]]), 1)
    eplb.save_token_stats(tmp_path / "s.json", torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"expert map .*not statistics"):
        eplb.load_stats(tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"statistics .*not an expert map"):
        eplb.load_map(tmp_path / "s.json")
    with pytest.raises(ValueError, match="expected a JSON object"):
        eplb.detect_format(_write(tmp_path / "l.json", "[1, 2]"))
    # SGLang's per-token dump holds records, not logical_count: neither statistics nor a map.
    torch.save({"records": [], "last_physical_to_logical_map": None}, tmp_path / "detail.pt")
    with pytest.raises(ValueError, match=r"not token statistics nor an expert map \(keys \["):
        eplb.load_stats(tmp_path / "detail.pt")


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_content_and_permissions(tmp_path):
    target = tmp_path / "f.txt"
    assert fileio.atomic_write_text(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # like a plain open()
    target.chmod(0o600)
    fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # an existing file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with pytest.raises(TypeError):
        fileio.atomic_write_bytes(target, "text")
    with pytest.raises(FileNotFoundError):
        fileio.atomic_write_text(tmp_path / "missing" / "f.txt", "x")


def test_atomic_write_fsyncs_the_temp_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fileio.atomic_write_text(tmp_path / "f.json", "{}")
    temp = events[1][1]
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".f.json.")
    assert events[0] == ("fsync", temp)  # the data reaches the disk before the rename
    assert events[1] == ("replace", temp, os.fspath(tmp_path / "f.json"))
    assert events[2] == ("fsync", os.fspath(tmp_path))  # then the folder entry


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# The writer loads eplb/fileio.py by path: it needs no torch, so each child starts in ~50 ms.
_WRITER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fileio", sys.argv[1])
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
target, size = sys.argv[2], int(sys.argv[3])
generation = int(sys.argv[4])
while True:
    generation += 1
    payload = str(generation % 10) * size
    fileio.atomic_write_text(target, json.dumps({"generation": generation, "payload": payload}))
    if generation == int(sys.argv[4]) + 1:
        print("ready", flush=True)
"""


def _check_complete(target: Path, size: int) -> int:
    doc = json.loads(target.read_text())  # a torn file would not parse
    assert doc["payload"] == str(doc["generation"] % 10) * size
    return doc["generation"]


def test_kill_9_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "token_collects_all.json"
    size = 4 << 20  # 4 MB: a kill usually lands in the middle of a write
    rng = random.Random(1234)
    generation = 0
    target.write_text(json.dumps({"generation": 0, "payload": "0" * size}))
    for _ in range(12):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                fileio.__file__,
                str(target),
                str(size),
                str(generation),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.15))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        seen = _check_complete(target, size)
        assert seen > generation  # the child did replace the file at least once
        generation = seen
        leftovers = [p.name for p in tmp_path.iterdir() if p != target]
        assert all(
            n.startswith(".token_collects_all.json.") and n.endswith(".tmp") for n in leftovers
        )
        for name in leftovers:
            (tmp_path / name).unlink()


def test_pretty_json_of_maps_reads_back_with_plain_json(tmp_path):
    # The writer's own layout (lists on one line) is still plain JSON, byte-stable across saves.
    phy2log = _balanced_map(2, 4, 4, 2, seed=1)
    first = eplb.save_expert_map(tmp_path / "a.json", phy2log, 2).read_bytes()
    second = eplb.save_expert_map(tmp_path / "b.json", eplb.load_expert_map(tmp_path / "a.json"), 2)
    assert second.read_bytes() == first
    assert json.load(io.StringIO(first.decode()))["moe_layer_count"] == 2
    assert copy.deepcopy(json.loads(first)) == eplb.expert_map_to_json(phy2log, 2)
