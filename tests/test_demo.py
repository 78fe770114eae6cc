"""The workflow demo (``python -m lplb.demo``), run as a user runs it, in a subprocess with small
flags: its report must be complete and self-consistent, its files loadable, its tables printed.

Independent checks: the statistics file and the map are read back with eplb's loaders; the
per-batch ratios are recomputed from the snapshot's per-rank loads; the LP optimum (HiGHS) is a
lower bound of any split of the same batch on the same layout, so it can never exceed the
Planner's result; every strategy's per-rank loads must sum to the batch's routed ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb

FLAGS = [
    "--ranks",
    "16",
    "--experts",
    "64",
    "--topk",
    "4",
    "--tokens",
    "512",
    "--batches",
    "30",
    "--collect-batches",
    "5",
    "--interval",
    "5",
    "--drift",
    "0.02",
    "--seed",
    "3",
]
STRATEGIES = ["none", "eplb", "lplb", "eplb+lplb", "optimum_lplb", "optimum_eplb+lplb"]


def _run(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "lplb.demo", *FLAGS, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo")
    done = _run(out)
    return out, json.loads((out / "report.json").read_text()), done.stdout


def test_prints_the_steps_the_tables_and_the_output_folder(demo) -> None:
    out, report, stdout = demo
    assert f"output folder: {out}" in stdout
    for step in ("[1/3] collect", "[2/3] generate", "$ eplb generate-map", "[3/3]"):
        assert step in stdout
    for s in report["strategies"].values():
        assert s["label"] in stdout
    assert "mean" in stdout and "p99" in stdout and "ms/call" in stdout


def test_report_structure(demo) -> None:
    out, report, _ = demo
    assert list(report["strategies"]) == STRATEGIES
    assert report["out_dir"] == str(out)
    assert report["config"]["ranks"] == 16 and report["config"]["batches"] == 30
    for key in ("device", "versions", "command", "date", "seconds", "rebalances", "generate"):
        assert key in report
    for s in report["strategies"].values():
        assert len(s["max_over_mean_per_batch"]) == 30
        assert {"label", "definition", "mean", "p99", "max", "ms_per_call"} <= set(s)
    assert len(report["mean_rank_load_per_batch"]) == 30
    assert report["lp_groups_total"] == 2 * 2 * 30  # 2 Planners x 2 groups of 8 x 30 batches
    assert report["lp_groups_converged"] == report["lp_groups_total"]


def test_statistics_and_map_files(demo) -> None:
    out, report, _ = demo
    counts = eplb.load_stats(out / "token_collects_all.json")
    assert counts.shape == (1, 64)
    assert int(counts.sum()) == report["collect"]["routed_ids"] == 5 * 512 * 4
    phy2log, gpus = eplb.load_map(report["generate"]["map_file"])
    assert gpus == 16 and phy2log.shape == (1, 64 + 2 * 16)
    assert eplb.count_duplicate_rows(phy2log, 16) == 0  # the balanced policy
    # The generated map is what generate-map computes from those statistics.
    expected = eplb.rebalance_experts(counts, 96, 1, 1, 16, policy="balanced")[0]
    assert torch.equal(phy2log, expected)
    move = report["generate"]["move"]
    assert move["bytes"] == move["transfers"] * move["expert_bytes"] >= move["min_bytes"] > 0
    assert move["expert_bytes"] == 3 * 7168 * 2048 * 2


def test_summaries_match_the_per_batch_values(demo) -> None:
    _, report, _ = demo
    for s in report["strategies"].values():
        values = np.asarray(s["max_over_mean_per_batch"])
        assert s["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert s["p99"] == pytest.approx(np.quantile(values, 0.99), rel=1e-12)
        assert s["max"] == pytest.approx(values.max(), rel=1e-12)
        assert (values >= 1.0 - 1e-12).all()


def test_snapshot_loads_conserve_tokens_and_match_the_series(demo) -> None:
    _, report, _ = demo
    snap = report["snapshot"]
    batch = snap["batch"]
    assert batch == 29
    assert snap["mean"] == report["mean_rank_load_per_batch"][batch] == 512 * 4 / 16
    for key, loads in snap["rank_loads"].items():
        assert len(loads) == 16
        assert sum(loads) == pytest.approx(512 * 4, rel=1e-12)
        ratio = max(loads) / snap["mean"]
        per_batch = report["strategies"][key]["max_over_mean_per_batch"][batch]
        assert per_batch == pytest.approx(ratio, rel=1e-12)


def test_balancing_relations(demo) -> None:
    _, report, _ = demo
    s = report["strategies"]

    def series(key: str) -> np.ndarray:
        return np.asarray(s[key]["max_over_mean_per_batch"])

    # The exact LP optimum bounds the Planner's split on the same layout, batch by batch.
    assert (series("optimum_lplb") <= series("lplb") + 1e-6).all()
    assert (series("optimum_eplb+lplb") <= series("eplb+lplb") + 1e-6).all()
    # The Planner's solve is exact: its split is within rounding of the optimum. Each replicated
    # expert's share is rounded to whole tokens (at most 1/2 off), and a rank holds 2 replicated
    # originals and 2 copies: at most 2 tokens over, against a mean of 512 * 4 / 16 = 128.
    for key in ("lplb", "eplb+lplb"):
        assert (series(key) <= series(f"optimum_{key}") + 2 / 128 + 1e-9).all()
    # On this drifting, noisy workload each balancer beats no balancing, and the combination
    # beats EPLB alone on average.
    assert s["eplb"]["mean"] < s["none"]["mean"]
    assert s["lplb"]["mean"] <= s["none"]["mean"]
    assert s["eplb+lplb"]["mean"] <= s["eplb"]["mean"]


def test_rebalances_are_recorded_with_their_moves(demo) -> None:
    _, report, stdout = demo
    rebalances = report["rebalances"]
    assert rebalances, "the drift must make the manager rebalance at least once"
    for r in rebalances:
        assert 0 <= r["batch"] < 30 and (r["batch"] + 1) % 5 == 0  # decision points
        assert r["balancedness_after"] > r["balancedness_before"]
        assert r["changed_slots"] > 0
        assert r["eplb_move_bytes"] >= r["eplb_min_move_bytes"]
        assert f"batch {r['batch']}: rebalance" in stdout


def test_plots_written(demo) -> None:
    out, report, _ = demo
    pytest.importorskip("matplotlib")
    assert sorted(Path(p).name for p in report["plots"]) == ["imbalance.png", "rank_loads.png"]
    for path in report["plots"]:
        assert Path(path).parent == out
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_tables_still_print(tmp_path: Path) -> None:
    # A `matplotlib` package that fails to import shadows the real one.
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}
    out = tmp_path / "out"
    done = _run(out, "--batches", "3", env=env)
    assert "matplotlib is missing, PNGs skipped" in done.stdout
    assert "EPLB + LPLB" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["plots"] == [] and not list(out.glob("*.png"))
    assert report["versions"]["matplotlib"] == "missing"


def test_no_plots_flag_and_quiet(tmp_path: Path) -> None:
    done = _run(tmp_path, "--batches", "3", "--no-plots", "--quiet")
    assert done.stdout.strip() == str(tmp_path.resolve())
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.json").exists()


def test_bad_flags_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lplb.demo", "--ranks", "12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--ranks 12 is not a multiple of the topology's 8" in done.stderr


def test_drifting_routing() -> None:
    from lplb.demo_workload import DriftingRouting

    a = DriftingRouting(32, 4, 200, sigma=1.0, drift=0.05, seed=7)
    b = DriftingRouting(32, 4, 200, sigma=1.0, drift=0.05, seed=7)
    batch = a.batch()
    assert batch.shape == (200, 4) and batch.dtype == torch.int64
    assert ((batch >= 0) & (batch < 32)).all()
    assert (batch.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    assert torch.equal(batch, b.batch())  # the seed fixes the batches
    before = a.popularity()
    assert before.sum().item() == pytest.approx(1.0)
    a.advance()
    assert not torch.equal(a.popularity(), before)  # it drifts
    still = DriftingRouting(32, 4, 200, drift=0.0, seed=1)
    p = still.popularity()
    still.advance()
    assert torch.allclose(still.popularity(), p)  # drift 0: no change
    # Popular experts are picked more often: Gumbel top-k samples proportionally.
    counts = torch.bincount(DriftingRouting(32, 1, 20000, sigma=1.5, seed=2).batch().flatten())
    hot = DriftingRouting(32, 1, 20000, sigma=1.5, seed=2).popularity().argmax()
    assert counts.argmax() == hot
    with pytest.raises(ValueError, match="drift"):
        DriftingRouting(32, 4, 200, drift=1.5)
