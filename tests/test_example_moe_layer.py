"""examples/moe_layer.py: the MoE layer's output does not depend on balancing, every rank's load
is the Planner's mapping, and the layer runs over gloo processes, under torch.compile and (GPU)
in CUDA graphs.

Oracles: ``reference_moe`` computes every token's output from the logical experts, token by
token; the expected per-rank loads are rebuilt from the Planner's documented pieces
(``count_workload`` per rank, ``solve_probs`` on the summed workload, ``weighted_select_target``),
independently of the layer's dispatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moves_cases import NVLS_OFF, free_port, init_group, spawn

import eplb
from lplb import Planner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import moe_layer  # noqa: E402

HIDDEN, FFN, EXPERTS, TOPK = 16, 32, 16, 2
F64 = {"rtol": 1e-10, "atol": 1e-10}


def _args(ep: int, *extra: str) -> object:
    return moe_layer.parse_args(
        [
            "--experts",
            str(EXPERTS),
            "--topk",
            str(TOPK),
            "--hidden",
            str(HIDDEN),
            "--ffn",
            str(FFN),
            "--ep",
            str(ep),
            "--redundant",
            "2",
            "--dtype",
            "float64",
            *extra,
        ]
    )


def _tokens(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return moe_layer.tokens(torch.Generator().manual_seed(seed), n, HIDDEN, device, torch.float64)


def _expected_slots(
    planner: Planner,
    history: torch.Tensor | None,
    ids_per_rank: list[torch.Tensor],
    solve_device: str = "cpu",
) -> list[torch.Tensor]:
    """Every rank's physical slots as the Planner maps them when the ranks' expert counts are
    summed (what ``Planner(group=...)`` does), rebuilt in one process from its public steps on
    a fresh Planner with the same configuration and load history. The LP is solved on
    ``solve_device`` (the GPU solve's float32 shares may differ from the CPU's in the last bit,
    which can move one token across a rounding boundary); counting and mapping run on the CPU."""
    single = Planner(
        planner.r2o.cpu(), planner.n_routed, planner.n_logical, planner.ep_size, num_nodes=1
    )
    single.update_redundancy_mapping(history)
    assert torch.equal(single.phy2log.cpu(), planner.phy2log.cpu())
    counted = [single.count_workload(ids.cpu(), 4) for ids in ids_per_rank]
    workload = sum(w for w, _ in counted).to(solve_device)
    avail = torch.zeros(1, dtype=torch.int64, device=solve_device)
    probs = single.solve_probs(workload, avail)[0].cpu()
    return [
        single.weighted_select_target(ids.cpu(), probs, by_sm, 4).long()
        for ids, (_, by_sm) in zip(ids_per_rank, counted, strict=True)
    ]


def _per_slot(slots: torch.Tensor, planner: Planner) -> torch.Tensor:
    """[R] int64 entries per physical slot."""
    return torch.bincount(slots.reshape(-1).cpu().long(), minlength=planner.n_routed)


def _per_rank(slots: torch.Tensor, planner: Planner) -> torch.Tensor:
    """[ep_size] int64 entries per EP rank."""
    return _per_slot(slots, planner).view(planner.ep_size, -1).sum(1)


# ------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("dispatch", ["grouped", "dense"])
def test_output_independent_of_balancing_and_loads_match_the_planner(dispatch: str) -> None:
    planner, bank, layer = moe_layer.build(
        _args(8, "--dispatch", dispatch), torch.device("cpu"), 0, 1, None
    )
    history = None
    for phase in range(2):
        x = _tokens(10 + phase, 96)
        weights, ids = layer.router(x)
        expected = moe_layer.reference_moe(x, weights, ids, bank)

        layer.balance = False
        plain = layer(x)
        plain_load = layer.last_slot_load.clone()
        layer.balance = True
        out = layer(x)
        load = layer.last_slot_load.clone()

        torch.testing.assert_close(plain, expected, **F64)
        torch.testing.assert_close(out, expected, **F64)
        torch.testing.assert_close(out, plain, **F64)
        # Slot loads: originals only, and the Planner's mapping of the same ids.
        originals = planner.log2phy[:, 0].long()[ids]
        assert torch.equal(plain_load, _per_slot(originals, planner))
        (slots,) = _expected_slots(planner, history, [ids])
        assert torch.equal(load, _per_slot(slots, planner))
        # Not vacuous: the LP moved entries onto copies (each rank's last slots) and did not
        # load the busiest rank more than the originals did.
        assert load.view(planner.ep_size, -1)[:, planner.n_local_logical :].sum() > 0
        assert _per_rank(slots, planner).max() <= _per_rank(originals, planner).max()

        if phase == 0:  # relayout from the statistics; the slots get their new experts' weights
            history = torch.bincount(ids.reshape(-1), minlength=EXPERTS)
            changed, stats = moe_layer.relayout(layer, history)
            assert changed > 0 and stats.bytes_copied > 0
            for moved, want in zip(layer.slot_weights(), bank.slots(layer.experts), strict=True):
                assert torch.equal(moved, want)


def test_collector_attached_to_the_router_counts_the_routed_ids(tmp_path: Path) -> None:
    _, _, layer = moe_layer.build(_args(8), torch.device("cpu"), 0, 1, None)
    collector = eplb.TokenCollector(1, EXPERTS, device="cpu")
    collector.attach(layer, [layer.router], topk_ids=1)
    x = _tokens(3, 64)
    layer(x)
    _, ids = layer.router(x)  # counted too: a second forward of the router
    assert torch.equal(collector.counts()[0], 2 * torch.bincount(ids.reshape(-1), minlength=16))
    path = collector.flush(tmp_path)
    assert torch.equal(eplb.load_stats(path)[0], collector.counts()[0])


def test_compiled_layer_fullgraph_matches_eager() -> None:
    _, _, layer = moe_layer.build(_args(8, "--dispatch", "dense"), torch.device("cpu"), 0, 1, None)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        x = _tokens(seed, 64)
        torch.testing.assert_close(compiled(x), layer(x), **F64)


def test_help() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "moe_layer.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--cuda-graph" in done.stdout and "torchrun" in done.stdout


# ------------------------------------------------------------------------------- gloo processes


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    device = init_group(rank, world, port, "gloo", 60.0)
    try:
        planner, bank, layer = moe_layer.build(_args(world), device, rank, world, dist.group.WORLD)
        record = {"phases": []}
        for phase in range(2):
            x = _tokens(100 * phase + rank, 40)
            weights, ids = layer.router(x)
            layer.balance = False
            plain = layer(x)
            plain_load = layer.last_slot_load.clone()
            layer.balance = True
            balanced = layer(x)
            record["phases"].append(
                {
                    "x": x,
                    "weights": weights,
                    "ids": ids,
                    "plain": plain,
                    "balanced": balanced,
                    "plain_load": plain_load,
                    "load": layer.last_slot_load.clone(),
                    "phy2log": planner.phy2log.clone(),
                }
            )
            if phase == 0:
                history = torch.bincount(ids.reshape(-1), minlength=EXPERTS)
                dist.all_reduce(history)
                record["history"] = history
                changed, stats = moe_layer.relayout(layer, history)
                record["changed"], record["received"] = changed, stats.bytes_received
                record["moved_ok"] = all(
                    torch.equal(a, b)
                    for a, b in zip(layer.slot_weights(), bank.slots(layer.experts), strict=True)
                )
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_processes_each_rank_computes_its_slots(world: int, tmp_path: Path) -> None:
    spawn(_gloo_worker, world, (free_port(), str(tmp_path)), timeout=120.0)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    args = _args(world)
    planner = Planner(moe_layer.ring(world), EXPERTS + 2 * world, EXPERTS, world, num_nodes=1)
    _, bank, _ = moe_layer.build(args, torch.device("cpu"), 0, 1, None)
    assert sum(r["received"] for r in records) > 0  # the relayout moved experts between ranks
    for phase in range(2):
        history = records[0]["history"] if phase else None
        planner.update_redundancy_mapping(history)
        steps = [r["phases"][phase] for r in records]
        for step in steps:
            assert torch.equal(step["phy2log"].cpu(), planner.phy2log.cpu())
            want = moe_layer.reference_moe(step["x"], step["weights"], step["ids"], bank)
            torch.testing.assert_close(step["plain"], want, **F64)
            torch.testing.assert_close(step["balanced"], want, **F64)
        # Each process computed exactly the entries the Planner sent to its own slots.
        slots = _expected_slots(planner, history, [s["ids"] for s in steps])
        expected = sum(_per_slot(s, planner) for s in slots).view(world, -1)
        assert all(torch.equal(s["load"], expected[r]) for r, s in enumerate(steps))
        originals = [planner.log2phy[:, 0].long()[s["ids"]] for s in steps]
        expected = sum(_per_slot(o, planner) for o in originals).view(world, -1)
        assert all(torch.equal(s["plain_load"], expected[r]) for r, s in enumerate(steps))
    assert all(r["moved_ok"] for r in records) and records[0]["changed"] > 0


# ------------------------------------------------------------------------------- GPU


def _cuda_layer(dispatch: str) -> tuple[Planner, moe_layer.ExpertBank, moe_layer.MoELayer]:
    args = _args(8, "--dispatch", dispatch, "--dtype", "float32")
    return moe_layer.build(args, torch.device("cuda"), 0, 1, None)


def _cuda_tokens(seed: int) -> torch.Tensor:
    return _tokens(seed, 256, "cuda").float()


@pytest.mark.gpu
@pytest.mark.parametrize("dispatch", ["grouped", "dense"])
def test_gpu_layer_matches_reference_and_planner(dispatch: str) -> None:
    planner, bank, layer = _cuda_layer(dispatch)
    x = _cuda_tokens(5)
    weights, ids = layer.router(x)
    layer.balance = False
    plain = layer(x)
    layer.balance = True
    out = layer(x)
    want = moe_layer.reference_moe(x, weights, ids, bank)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    (slots,) = _expected_slots(planner, None, [ids], "cuda")
    assert torch.equal(layer.last_slot_load.cpu(), _per_slot(slots, planner))
    planner.check_errors()


@pytest.mark.gpu
def test_gpu_torch_compile() -> None:
    _, _, layer = _cuda_layer("dense")
    compiled = torch.compile(layer, fullgraph=True)
    for seed in (1, 2, 3):
        x = _cuda_tokens(seed)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    # With the collector attached (its hook is traced too; not fullgraph-checked here). A fresh
    # compile: the cache of the first one must not serve a module that now has a hook.
    torch._dynamo.reset()
    collector = eplb.TokenCollector(1, EXPERTS, device="cuda")
    collector.attach(layer, [layer.router], topk_ids=1)
    compiled = torch.compile(layer)
    x = _cuda_tokens(4)
    out = compiled(x)
    _, ids = layer.router(x)
    torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(collector.counts()[0], 3 * torch.bincount(ids.reshape(-1), minlength=16))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay() -> None:
    planner, bank, layer = _cuda_layer("dense")
    collector = eplb.TokenCollector(1, EXPERTS, device="cuda")
    collector.attach(layer, [layer.router], topk_ids=1)
    runner = moe_layer.Runner(layer, False, True, _cuda_tokens(0))
    collector.reset()
    expected_counts = torch.zeros(EXPERTS, dtype=torch.int64)
    for seed in (1, 2, 3):
        x = _cuda_tokens(seed)
        out = runner(x)
        collector.enabled = False
        weights, ids = layer.router(x)
        want = moe_layer.reference_moe(x, weights, ids, bank)
        collector.enabled = True
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        (slots,) = _expected_slots(planner, None, [ids], "cuda")
        assert torch.equal(layer.last_slot_load.cpu(), _per_slot(slots, planner))
        expected_counts += torch.bincount(ids.reshape(-1).cpu(), minlength=EXPERTS)
    assert torch.equal(collector.counts()[0].cpu(), expected_counts)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for the NCCL run")
def test_gpu_torchrun_nccl(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            f"--master-port={free_port()}",
            str(ROOT / "examples" / "moe_layer.py"),
            "--device",
            "cuda",
            "--batches",
            "3",
            "--stats-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **NVLS_OFF},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(outputs equal)") == 2
    counts = eplb.load_stats(tmp_path)
    assert int(counts.sum()) == 2 * 2 * 3 * 512 * 4  # phases x ranks x batches x tokens x k
