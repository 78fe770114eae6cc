"""MoEAnalyzer numbers against hand-computed values; hooks; gloo aggregation; CUDA events."""

from __future__ import annotations

import json
import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb.analyzer as analyzer_module
from eplb import MoEAnalyzer, load_imbalance


class FakeClock:
    """perf_counter stand-in: each reading advances by the next scripted step."""

    def __init__(self, steps: list[float]) -> None:
        self.now = 0.0
        self.steps = list(steps)

    def __call__(self) -> float:
        value = self.now
        self.now += self.steps.pop(0) if self.steps else 0.0
        return value


def time_empty_blocks(analyzer: MoEAnalyzer, phases: list[str]) -> None:
    """One empty ``with analyzer.time(phase)`` block per entry (a FakeClock sets durations)."""
    for phase in phases:
        with analyzer.time(phase):
            pass


def test_load_imbalance_hand_computed() -> None:
    # mu = 25; deviations -15, -5, 5, 15 -> ((0.6)^2 + (0.2)^2 + (0.2)^2 + (0.6)^2) / 4 = 0.2
    got = load_imbalance(torch.tensor([10, 20, 30, 40]))
    assert got["normalized_variance"] == pytest.approx(0.2, rel=1e-14)
    assert got["cv"] == pytest.approx(math.sqrt(0.2), rel=1e-14)
    assert got["max_over_mean"] == pytest.approx(1.6, rel=1e-14)
    assert load_imbalance(torch.tensor([7, 7, 7])) == {
        "normalized_variance": 0.0,
        "cv": 0.0,
        "max_over_mean": 1.0,
    }
    assert load_imbalance(torch.zeros(4)) == {
        "normalized_variance": 0.0,
        "cv": 0.0,
        "max_over_mean": 1.0,
    }


def test_totals_not_per_batch_averages(tmp_path) -> None:
    # The imbalance uses per-expert totals over the epoch, whatever the number of batches
    # (a formula that mixes per-batch averages with totals would depend on it).
    reports = []
    for batches in (1, 5):
        analyzer = MoEAnalyzer(4, log_dir=tmp_path, device="cpu", print_table=False)
        for _ in range(batches):
            analyzer.record_tokens(counts=torch.tensor([10, 20, 30, 40]))
        reports.append(analyzer.end_epoch(0))
    assert reports[0]["load_imbalance"] == pytest.approx(reports[1]["load_imbalance"], rel=1e-14)
    assert reports[1]["tokens_per_expert"] == [50, 100, 150, 200]
    assert reports[1]["load_imbalance"]["normalized_variance"] == pytest.approx(0.2, rel=1e-14)


def test_record_tokens_against_loop(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    analyzer = MoEAnalyzer(6, log_dir=tmp_path, device="cpu", print_table=False)
    want = [0] * 6
    for _ in range(3):
        ids = torch.randint(-1, 6, (50, 2), generator=gen)
        analyzer.record_tokens(ids)
        for e in ids.flatten().tolist():
            if e >= 0:
                want[e] += 1
    counts = torch.randint(0, 9, (2, 3, 6), generator=gen, dtype=torch.int32)
    analyzer.record_tokens(counts=counts)
    for row in counts.reshape(-1, 6).tolist():
        for e, c in enumerate(row):
            want[e] += c
    report = analyzer.end_epoch(3)
    assert report["tokens_per_expert"] == want
    assert report["total_tokens"] == sum(want)


def test_record_tokens_rejects_bad_input(tmp_path) -> None:
    analyzer = MoEAnalyzer(4, log_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="holds 4"):
        analyzer.record_tokens(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="holds -2"):
        analyzer.record_tokens(torch.tensor([-2]))
    with pytest.raises(TypeError, match="exactly one"):
        analyzer.record_tokens()
    with pytest.raises(TypeError, match="exactly one"):
        analyzer.record_tokens(torch.tensor([0]), counts=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        analyzer.record_tokens(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        analyzer.record_tokens(counts=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        analyzer.record_tokens(counts=torch.tensor([1, -1, 0, 0]))
    with pytest.raises(ValueError, match="phase"), analyzer.time("dispatch"):
        pass
    with pytest.raises(ValueError, match="epoch"):
        analyzer.end_epoch(-1)
    with pytest.raises(ValueError, match="num_experts"):
        MoEAnalyzer(0)
    with pytest.raises(ValueError, match="device"):
        MoEAnalyzer(4, device="meta")
    with pytest.raises(ValueError, match="device"):
        MoEAnalyzer(4, device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MoEAnalyzer(4, device="cuda")


def test_cpu_timings_hand_computed(tmp_path, monkeypatch) -> None:
    # Readings: routing 0.5 s, routing 1.5 s, computation 2.0 s, communication 1.0 s.
    clock = FakeClock([0.5, 0.0, 1.5, 0.0, 2.0, 0.0, 1.0, 0.0])
    monkeypatch.setattr(analyzer_module, "perf_counter", clock)
    analyzer = MoEAnalyzer(2, log_dir=tmp_path, device="cpu", print_table=False)
    assert analyzer.timing == "perf_counter"
    time_empty_blocks(analyzer, ["routing", "routing", "computation"])
    timer = analyzer.start("communication")
    analyzer.stop(timer)
    phases = analyzer.end_epoch(0)["phases"]
    assert phases["routing"] == {
        "seconds_per_rank": [2.0],
        "mean_seconds": 2.0,
        "max_seconds": 2.0,
        "calls": 2,
        "seconds_per_call": 1.0,
        "share": 0.4,
    }
    assert phases["computation"]["mean_seconds"] == 2.0
    assert phases["communication"]["share"] == 0.2
    assert phases["aggregation"] == {
        "seconds_per_rank": [0.0],
        "mean_seconds": 0.0,
        "max_seconds": 0.0,
        "calls": 0,
        "seconds_per_call": 0.0,
        "share": 0.0,
    }


def test_real_cpu_timing_and_exceptions_still_timed(tmp_path) -> None:
    analyzer = MoEAnalyzer(2, log_dir=tmp_path, device="cpu", print_table=False)
    with pytest.raises(KeyError), analyzer.time("aggregation"):
        time.sleep(0.02)
        raise KeyError("boom")
    seconds = analyzer.end_epoch(0)["phases"]["aggregation"]["mean_seconds"]
    assert 0.02 <= seconds < 2.0


def test_end_epoch_writes_one_json_per_epoch_and_resets(tmp_path, capsys) -> None:
    analyzer = MoEAnalyzer(4, log_dir=tmp_path / "logs", device="cpu")
    analyzer.record_tokens(counts=torch.tensor([10, 20, 30, 40]))
    first = analyzer.end_epoch(0)
    printed = capsys.readouterr().out
    assert "Epoch 0" in printed and "normalised variance 0.2000" in printed
    assert "max/mean 1.600" in printed
    analyzer.record_tokens(torch.tensor([1, 1, 2]))
    second = analyzer.end_epoch(1)
    folder = analyzer.run_dir
    assert folder.parent == tmp_path / "logs"
    assert folder.name.startswith("moe_performance_")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["epoch_0000.json", "epoch_0001.json"]  # no temporary files left
    assert json.loads((folder / "epoch_0000.json").read_text()) == first
    assert json.loads((folder / "epoch_0001.json").read_text()) == second
    assert second["tokens_per_expert"] == [0, 2, 1, 0]  # counters reset after epoch 0
    assert [h["epoch"] for h in analyzer.history] == [0, 1]
    # A second analyzer started in the same second gets its own folder.
    other = MoEAnalyzer(4, log_dir=tmp_path / "logs", device="cpu", print_table=False)
    other.end_epoch(0)
    assert other.run_dir != folder


def test_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    analyzer = MoEAnalyzer(3, log_dir=tmp_path, device="cpu", print_table=False, plots=True)
    for epoch in range(2):
        analyzer.record_tokens(counts=torch.tensor([5, 1, epoch]))
        analyzer.end_epoch(epoch)
    names = sorted(p.name for p in analyzer.run_dir.iterdir())
    assert names == [
        "epoch_0000.json",
        "epoch_0001.json",
        "experts_epoch_0000.png",
        "experts_epoch_0001.png",
        "imbalance.png",
    ]
    assert (analyzer.run_dir / "imbalance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_fail_early(monkeypatch) -> None:
    real = analyzer_module.importlib.util.find_spec
    monkeypatch.setattr(
        analyzer_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    with pytest.raises(ImportError, match="pip install matplotlib"):
        MoEAnalyzer(3, plots=True)


class TinyMoE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.combine = Combine()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        outs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [T, 4, 8]
        picked = outs.gather(1, ids[..., None].expand(-1, -1, 8))  # [T, 2, 8]
        return self.combine(picked, weights)


class Gate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x).softmax(-1).topk(2, dim=-1)


class Combine(torch.nn.Module):
    def forward(self, picked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (picked * weights[..., None]).sum(1)


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_attach_times_and_counts_through_hooks_and_detach_restores(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyMoE()
    x = [torch.randn(16, 8) for _ in range(3)]
    before = [model(b) for b in x]
    analyzer = MoEAnalyzer(4, log_dir=tmp_path, device="cpu", print_table=False)
    analyzer.attach(
        model,
        routing="gate",
        computation=list(model.experts),
        aggregation=model.combine,
        topk_ids=lambda out: out[1],
    )
    assert not no_hooks(model)
    during = [model(b) for b in x]
    analyzer.detach()
    assert no_hooks(model)
    after = [model(b) for b in x]
    for a, b, c in zip(before, during, after, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    report = analyzer.end_epoch(0)
    want = [0] * 4
    for b in x:
        for e in model.gate(b)[1].flatten().tolist():
            want[e] += 1
    assert report["tokens_per_expert"] == want
    assert report["phases"]["routing"]["calls"] == 3
    assert report["phases"]["computation"]["calls"] == 12  # 4 experts x 3 forwards
    assert report["phases"]["aggregation"]["calls"] == 3
    assert report["phases"]["communication"]["calls"] == 0
    assert report["phases"]["routing"]["mean_seconds"] > 0


def test_attach_rejects_unknown_modules() -> None:
    model = TinyMoE()
    analyzer = MoEAnalyzer(4, device="cpu")
    with pytest.raises(ValueError, match="no submodule 'router'"):
        analyzer.attach(model, routing="router")
    with pytest.raises(ValueError, match="not part of the model"):
        analyzer.attach(model, computation=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="routing"):
        analyzer.attach(model, computation="experts", topk_ids=lambda out: out)
    assert no_hooks(model)


# ------------------------------------------------------------------------- across processes
# One spawn of 4 processes checks both group sizes: the world (4 ranks) and a subgroup of ranks
# 0 and 1 (2 ranks), since starting the processes is what costs time.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _epoch(rank: int, world: int, group: object, logs: Path) -> dict:
    """Rank r spends r + 1 s routing per call (2 calls) and 0.25 s in communication."""
    analyzer_module.perf_counter = FakeClock([rank + 1.0, 0.0, rank + 1.0, 0.0, 0.25, 0.0])
    analyzer = MoEAnalyzer(4, world, log_dir=logs, device="cpu")
    time_empty_blocks(analyzer, ["routing", "routing", "communication"])
    analyzer.record_tokens(counts=torch.tensor([rank, 10, 0, 5 * rank]))
    report = analyzer.end_epoch(7, group=group)
    return {"report": report, "run_dir": str(analyzer.run_dir) if analyzer.run_dir else None}


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=4,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict = {4: _epoch(rank, 4, dist.group.WORLD, Path(out) / "logs4")}
        try:  # a group of another size is refused on every rank, before any collective
            MoEAnalyzer(4, 3, device="cpu").end_epoch(0, group=dist.group.WORLD)
        except ValueError as err:
            results["mismatch"] = str(err)
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        if rank < 2:
            results[2] = _epoch(rank, 2, pair, Path(out) / "logs2")
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run the 4 workers once, failing (and killing them) if they do not finish in time."""
    out = tmp_path_factory.mktemp("gloo")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=4, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 150.0
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("workers did not finish within 150 s")
    return out, [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("world", [2, 4])
def test_end_epoch_aggregates_over_ranks(world: int, gloo_results) -> None:
    out, all_results = gloo_results
    results = [all_results[r][world] for r in range(world)]
    reports = [r["report"] for r in results]
    for report in reports[1:]:
        assert {k: v for k, v in report.items() if k != "time"} == {
            k: v for k, v in reports[0].items() if k != "time"
        }
    report = reports[0]
    ranks = range(world)
    tokens = [sum(ranks), 10 * world, 0, 5 * sum(ranks)]
    assert report["tokens_per_expert"] == tokens
    assert report["world_size"] == world
    routing = report["phases"]["routing"]
    assert routing["seconds_per_rank"] == [2.0 * (r + 1) for r in ranks]
    assert routing["mean_seconds"] == pytest.approx(sum(2.0 * (r + 1) for r in ranks) / world)
    assert routing["max_seconds"] == 2.0 * world
    assert routing["calls"] == 2 * world
    assert routing["seconds_per_call"] == pytest.approx((world + 1) / 2)
    assert report["phases"]["communication"]["seconds_per_rank"] == [0.25] * world
    mu = sum(tokens) / 4
    nv = sum(((s - mu) / mu) ** 2 for s in tokens) / 4
    assert report["load_imbalance"]["normalized_variance"] == pytest.approx(nv, rel=1e-12)
    assert report["load_imbalance"]["max_over_mean"] == pytest.approx(max(tokens) / mu)
    # Only rank 0 of the group wrote, one file.
    assert results[0]["run_dir"] is not None
    assert all(r["run_dir"] is None for r in results[1:])
    files = list((out / f"logs{world}").rglob("*.json"))
    assert [f.name for f in files] == ["epoch_0007.json"]
    assert json.loads(files[0].read_text())["tokens_per_expert"] == tokens


def test_group_must_be_a_process_group_of_world_size(tmp_path, gloo_results) -> None:
    _, all_results = gloo_results
    for results in all_results:
        assert results["mismatch"] == "group has 4 ranks but world_size=3"
    analyzer = MoEAnalyzer(4, 2, log_dir=tmp_path, device="cpu")
    with pytest.raises(TypeError, match="ProcessGroup"):
        analyzer.end_epoch(0, group="world")


# ------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_event_timings_without_per_call_sync(tmp_path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    # Calibrate a ~20 ms kernel with separate events.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * 20.0 / start.elapsed_time(end))
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    expected = start.elapsed_time(end) / 1000.0

    analyzer = MoEAnalyzer(8, log_dir=tmp_path, print_table=False)
    assert analyzer.device == device and analyzer.timing == "cuda_events"
    ids = torch.randint(0, 8, (4096, 2), device=device)
    with analyzer.time("routing"):  # warm-up: the first use of a kernel loads it (~100 ms)
        analyzer.record_tokens(ids)
    analyzer.reset()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        host = time.perf_counter()
        for _ in range(3):
            with analyzer.time("computation"):
                torch.cuda._sleep(cycles)
            with analyzer.time("routing"):
                analyzer.record_tokens(ids)
        host = time.perf_counter() - host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert host < expected  # the host did not wait for the three kernels
    report = analyzer.end_epoch(0)
    computation = report["phases"]["computation"]
    assert computation["calls"] == 3
    assert computation["mean_seconds"] == pytest.approx(3 * expected, rel=0.1)
    assert report["tokens_per_expert"] == torch.bincount(ids.flatten(), minlength=8).mul(3).tolist()

    # Invalid ids on the GPU are caught at the epoch end (checking per call would sync).
    analyzer.record_tokens(torch.tensor([0, 9], device=device))
    with pytest.raises(ValueError, match="1 expert ids outside"):
        analyzer.end_epoch(1)
