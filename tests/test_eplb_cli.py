"""The ``eplb`` command line: run as ``python -m eplb`` subprocesses and through ``eplb.cli.main``,
on generated statistics, with every output map validated against the library and plain loops."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import eplb
from eplb import cli

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eplb", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse: usage errors and --help
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def skewed_stats(num_layers: int, num_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(num_layers, num_experts, generator=gen) ** 3 * 5000
    return base.to(torch.int64) + torch.randint(0, 50, (num_layers, num_experts), generator=gen)


def write_stats(folder: Path, counts: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    eplb.save_token_stats(folder / "token_collects_all.json", counts)
    return folder


def plain_balancedness(weight_row: list[int], phy_row: list[int], num_gpus: int) -> float:
    """Mean / max GPU load, a copy carrying its expert's load over its number of copies."""
    copies = Counter(phy_row)
    per = len(phy_row) // num_gpus
    loads = [
        sum(weight_row[e] / copies[e] for e in phy_row[g * per : (g + 1) * per])
        for g in range(num_gpus)
    ]
    return sum(loads) / len(loads) / max(loads) if max(loads) > 0 else 1.0


def table_rows(out: str, columns: int) -> list[list[str]]:
    """The data rows of the first table in ``out`` (lines of ``columns`` cells, first a digit)."""
    rows = []
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == columns and cells[0].isdigit():
            rows.append(cells)
        elif rows:
            break
    return rows


GEN = ["--num_groups", "4", "--num_nodes", "1", "--num_gpus", "8"]


# ------------------------------------------------------------------------------ generate-map


def test_generate_map_subprocess_writes_the_balanced_map(tmp_path):
    weight = skewed_stats(6, 16, seed=1)
    folder = write_stats(tmp_path / "stats", weight)
    out = tmp_path / "expert_map.json"
    result = run_module(
        "generate-map", "--json_folder", str(folder), "--num_replicas", "24", *GEN,
        "--output_path", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    phy2log, num_gpus = eplb.load_map(out)
    assert num_gpus == 8
    assert torch.equal(phy2log, eplb.rebalance_experts(weight, 24, 4, 1, 8, policy="balanced")[0])
    assert eplb.count_duplicate_rows(phy2log, 8) == 0

    rows = table_rows(result.stdout, 5)
    assert [int(r[0]) for r in rows] == list(range(6))
    for layer, (_, before, after, dups, moved) in enumerate(rows):
        w, p = weight[layer].tolist(), phy2log[layer].tolist()
        identity = list(range(16))  # expert e on GPU e // 2
        assert float(before) == pytest.approx(plain_balancedness(w, identity, 8), abs=5e-4)
        assert float(after) == pytest.approx(plain_balancedness(w, p, 8), abs=5e-4)
        assert (dups, moved) == ("0", "-")
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out} (mindspeed): 6 layers, 16 experts -> 24 slots on 8")
    assert "Traceback" not in result.stderr


def test_generate_map_sglang_deepseek(tmp_path, capsys):
    weight = skewed_stats(3, 16, seed=2)
    folder = write_stats(tmp_path / "s", weight)
    out = tmp_path / "init.json"
    code, stdout, _ = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", "32", *GEN,
        "--output_path", out, "--policy", "deepseek", "--format", "sglang",
    )  # fmt: skip
    assert code == 0
    phy2log = eplb.load_sglang_map(out)
    assert torch.equal(phy2log, eplb.rebalance_experts(weight, 32, 4, 1, 8)[0])
    dups = [int(r[3]) for r in table_rows(stdout, 5)]
    assert dups == [eplb.count_duplicate_rows(phy2log[layer], 8) for layer in range(3)]


def test_generate_map_from_an_sglang_dump(tmp_path, capsys):
    per_step = torch.stack([skewed_stats(2, 8, seed=s) for s in range(3)])
    torch.save({"rank": 0, "logical_count": per_step}, tmp_path / "dump.pt")
    out = tmp_path / "m.json"
    code, _, err = run_main(
        capsys, "generate-map", "--json_folder", tmp_path / "dump.pt", "--num_replicas", "8",
        "--num_groups", "1", "--num_nodes", "1", "--num_gpus", "4", "--output_path", out,
    )  # fmt: skip
    assert code == 0, err
    want = eplb.rebalance_experts(per_step.sum(0), 8, 1, 1, 4, policy="balanced")[0]
    assert torch.equal(eplb.load_expert_map(out), want)


def test_generate_map_keeps_the_old_map(tmp_path, capsys):
    old_weight, new_weight = skewed_stats(4, 16, seed=3), skewed_stats(4, 16, seed=4)
    old = eplb.rebalance_experts(old_weight, 24, 4, 1, 8, policy="balanced")[0]
    eplb.save_expert_map(tmp_path / "old.json", old, 8)
    folder = write_stats(tmp_path / "s", new_weight)
    out = tmp_path / "new.json"
    code, stdout, _ = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", "24", *GEN,
        "--output_path", out, "--old_map", tmp_path / "old.json",
    )  # fmt: skip
    assert code == 0
    want, _, _, changed = eplb.rebalance_experts(
        new_weight, 24, 4, 1, 8, policy="balanced", old_phy2log=old
    )
    assert torch.equal(eplb.load_expert_map(out), want)
    rows = table_rows(stdout, 5)
    for layer, (_, before, _, _, moved) in enumerate(rows):
        w = new_weight[layer].tolist()
        assert float(before) == pytest.approx(
            plain_balancedness(w, old[layer].tolist(), 8), abs=5e-4
        )
        assert int(moved) == int(changed[layer]) == int((want[layer] != old[layer]).sum())
    assert f"; {int(changed.sum())} of 96 slots moved" in stdout
    # An SGLang old map works too (its device count comes from --num_gpus).
    eplb.save_sglang_map(tmp_path / "old_sg.json", old)
    code, _, _ = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", "24", *GEN,
        "--output_path", tmp_path / "new2.json", "--old_map", tmp_path / "old_sg.json",
    )  # fmt: skip
    assert code == 0 and (tmp_path / "new2.json").read_bytes() == out.read_bytes()


def test_before_is_na_when_gpus_do_not_divide_experts(tmp_path, capsys):
    folder = write_stats(tmp_path / "s", skewed_stats(2, 12, seed=5))
    code, stdout, _ = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", "16",
        "--num_groups", "4", "--num_nodes", "1", "--num_gpus", "8",
        "--output_path", tmp_path / "m.json",
    )  # fmt: skip
    assert code == 0
    assert [r[1] for r in table_rows(stdout, 5)] == ["n/a", "n/a"]
    assert "balancedness n/a -> " in stdout


@pytest.mark.parametrize(
    ("layers", "experts", "replicas", "gpus"), [(1, 4, 4, 1), (2, 1, 4, 4), (1, 1, 1, 1)]
)
def test_generate_map_edge_cases(tmp_path, capsys, layers, experts, replicas, gpus):
    weight = skewed_stats(layers, experts, seed=6)
    folder = write_stats(tmp_path / "s", weight)
    code, _, err = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", replicas,
        "--num_groups", "1", "--num_nodes", "1", "--num_gpus", gpus,
        "--output_path", tmp_path / "m.json",
    )  # fmt: skip
    assert code == 0, err
    phy2log, num_gpus = eplb.load_map(tmp_path / "m.json")
    assert num_gpus == gpus and phy2log.shape == (layers, replicas)
    assert torch.equal(
        phy2log, eplb.rebalance_experts(weight, replicas, 1, 1, gpus, policy="balanced")[0]
    )


def test_quiet_prints_nothing(tmp_path, capsys):
    folder = write_stats(tmp_path / "s", skewed_stats(2, 8, seed=7))
    common = ["--json_folder", folder, "--num_replicas", "8", "--num_groups", "1"]
    common += ["--num_nodes", "1", "--num_gpus", "4", "--output_path", tmp_path / "m.json"]
    assert run_main(capsys, "--quiet", "generate-map", *common) == (0, "", "")
    assert run_main(capsys, "generate-map", *common, "-q") == (0, "", "")
    assert (tmp_path / "m.json").exists()


def _gen_args(tmp_path: Path, folder: Path, *extra: str) -> list:
    return ["generate-map", "--json_folder", folder, "--output_path", tmp_path / "m.json", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_replicas", "24", "--num_groups", "4", "--num_nodes", "1"], "required: --num_gpus"),
        (["--num_replicas", "0", *GEN], "expected a positive integer, got 0"),
        (["--num_replicas", "x", *GEN], "expected a positive integer, got 'x'"),
        (["--num_replicas", "20", *GEN], "num_replicas=20 is not a multiple of num_gpus=8"),
        (["--num_replicas", "8", *GEN], "num_replicas=8 is below the 16 experts"),
        (["--num_replicas", "24", *GEN, "--policy", "random"], "invalid choice: 'random'"),
        (["--num_replicas", "136", *GEN], "at most 16 slots per GPU"),
        (
            ["--num_replicas", "24", *GEN, "--policy", "deepseek", "--old_map", "x.json"],
            "--old_map needs --policy balanced",
        ),
    ],
)
def test_generate_map_usage_errors_exit_2(tmp_path, capsys, extra, message):
    folder = write_stats(tmp_path / "s", skewed_stats(2, 16, seed=8))
    code, stdout, err = run_main(capsys, *_gen_args(tmp_path, folder, *extra))
    assert code == 2
    assert message in err and "usage: eplb generate-map" in err
    assert "Traceback" not in err and stdout == ""
    assert not (tmp_path / "m.json").exists()


def test_deepseek_repeats_do_not_fit_the_mindspeed_format(tmp_path, capsys):
    weight = torch.tensor([[100000, 1, 1, 1]])  # expert 0 gets 13 of 16 slots on 4 GPUs
    folder = write_stats(tmp_path / "s", weight)
    args = ["--num_replicas", "16", "--num_groups", "1", "--num_nodes", "1", "--num_gpus", "4"]
    code, _, err = run_main(capsys, *_gen_args(tmp_path, folder, *args, "--policy", "deepseek"))
    assert code == 2 and "the mindspeed format forbids" in err
    assert not (tmp_path / "m.json").exists()
    code, _, _ = run_main(capsys, *_gen_args(tmp_path, folder, *args))  # balanced: fine
    assert (
        code == 0 and eplb.count_duplicate_rows(eplb.load_expert_map(tmp_path / "m.json"), 4) == 0
    )


def test_old_map_that_does_not_fit(tmp_path, capsys):
    folder = write_stats(tmp_path / "s", skewed_stats(2, 16, seed=9))
    old = eplb.rebalance_experts(skewed_stats(2, 16, seed=10), 24, 4, 1, 8, policy="balanced")[0]
    eplb.save_expert_map(tmp_path / "old8.json", old, 8)
    old4 = eplb.rebalance_experts(skewed_stats(2, 16, seed=10), 24, 4, 1, 4, policy="balanced")
    eplb.save_expert_map(tmp_path / "old4.json", old4[0], 4)
    eplb.save_expert_map(tmp_path / "old1layer.json", old[:1], 8)
    run = ["--num_replicas", "24", *GEN, "--old_map"]
    code, _, err = run_main(capsys, *_gen_args(tmp_path, folder, *run, tmp_path / "old4.json"))
    assert code == 2 and "has 4 devices" in err
    bigger = ["--num_replicas", "32", *GEN, "--old_map", tmp_path / "old8.json"]
    code, _, err = run_main(capsys, *_gen_args(tmp_path, folder, *bigger))
    assert code == 2 and "--old_map has 24 slots per layer but --num_replicas is 32" in err
    code, _, err = run_main(capsys, *_gen_args(tmp_path, folder, *run, tmp_path / "old1layer.json"))
    assert code == 1 and "has 1 layers and 16 experts but" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ('{"0": {"0": 1}, "2": {"0": 1}}', "layer 1 is missing"),
        ("{}", "the statistics hold no layers or no experts"),
        ('{"0": {"0": 1', "not valid JSON"),
    ],
)
def test_bad_statistics_exit_1_without_traceback(tmp_path, capsys, content, message):
    folder = tmp_path / "s"
    if content is not None:
        folder.mkdir()
        (folder / "token_collects_all.json").write_text(content)
    code, _, err = run_main(capsys, *_gen_args(tmp_path, folder, "--num_replicas", "24", *GEN))
    assert code == 1
    assert err.startswith("eplb generate-map: error: ") and message in err
    assert "usage:" not in err


def test_bad_file_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "token_collects_all.json").write_text('{"0": {"1": -5}}')
    result = run_module(
        "generate-map", "--json_folder", str(tmp_path), "--num_replicas", "8",
        "--num_groups", "1", "--num_nodes", "1", "--num_gpus", "4",
        "--output_path", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "layer 0, expert 1: token count -5 is not a non-negative integer" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_output_folder_exits_1(tmp_path, capsys):
    folder = write_stats(tmp_path / "s", skewed_stats(1, 4, seed=11))
    code, _, err = run_main(
        capsys, "generate-map", "--json_folder", folder, "--num_replicas", "4",
        "--num_groups", "1", "--num_nodes", "1", "--num_gpus", "2",
        "--output_path", tmp_path / "absent" / "m.json",
    )  # fmt: skip
    assert code == 1 and "No such file or directory" in err


# ----------------------------------------------------------------------------------- inspect


@pytest.fixture
def inspected(tmp_path):
    weight = skewed_stats(3, 16, seed=12)
    folder = write_stats(tmp_path / "s", weight)
    phy2log = eplb.rebalance_experts(weight, 24, 4, 1, 8, policy="balanced")[0]
    eplb.save_expert_map(tmp_path / "m.json", phy2log, 8)
    return weight, phy2log, folder, tmp_path / "m.json"


def test_inspect_tables(capsys, inspected):
    weight, phy2log, folder, path = inspected
    code, out, _ = run_main(capsys, "inspect", path, "--stats", folder, "--layer", "2")
    assert code == 0
    layer_rows = table_rows(out, 8)
    assert len(layer_rows) == 3
    for layer, row in enumerate(layer_rows):
        w, p = weight[layer].tolist(), phy2log[layer].tolist()
        assert float(row[1]) == pytest.approx(plain_balancedness(w, p, 8), abs=5e-4)
        assert float(row[2]) == pytest.approx(plain_balancedness(w, list(range(16)), 8), abs=5e-4)
        assert int(row[7]) == sum(1 for c in Counter(p).values() if c > 1)
    gpu_part = out.split("\n\n")[1]
    gpu_rows = table_rows(gpu_part, 5)
    assert len(gpu_rows) == 8
    for gpu, row in enumerate(gpu_rows):
        total = 0.0
        for layer in range(3):
            copies = Counter(phy2log[layer].tolist())
            for e in phy2log[layer, gpu * 3 : gpu * 3 + 3].tolist():
                total += weight[layer, e].item() / copies[e]
        assert float(row[1]) == pytest.approx(total, abs=0.051)
    layer_two = out.split("layer 2:\n")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[2:] for line in layer_two] == [
        [str(e) for e in phy2log[2, g * 3 : g * 3 + 3].tolist()] for g in range(8)
    ]
    assert f"{path}: 3 layers, 16 experts, 24 slots on 8 GPUs" in out


def test_inspect_without_stats_and_sglang_maps(tmp_path, capsys, inspected):
    _, phy2log, _, _ = inspected
    eplb.save_sglang_map(tmp_path / "sg.json", phy2log)
    code, _, err = run_main(capsys, "inspect", tmp_path / "sg.json")
    assert code == 2 and "give --num_gpus" in err
    code, _, err = run_main(capsys, "inspect", tmp_path / "sg.json", "--num_gpus", "5")
    assert code == 2 and "does not divide the 24 slots" in err
    code, out, _ = run_main(capsys, "inspect", tmp_path / "sg.json", "--num_gpus", "8")
    assert code == 0
    # Every expert weighs 1: a GPU's load is the sum of 1/copies over its slots.
    for layer, row in enumerate(table_rows(out, 8)):
        ones = [1] * 16
        assert float(row[1]) == pytest.approx(
            plain_balancedness(ones, phy2log[layer].tolist(), 8), abs=5e-4
        )


def test_inspect_before_map_and_mismatches(tmp_path, capsys, inspected):
    weight, _, folder, path = inspected
    other = eplb.rebalance_experts(weight, 24, 4, 1, 8)[0]
    eplb.save_sglang_map(tmp_path / "before.json", other)
    code, out, _ = run_main(
        capsys, "inspect", path, "--stats", folder, "--before", tmp_path / "before.json"
    )
    assert code == 0
    for layer, row in enumerate(table_rows(out, 8)):
        want = plain_balancedness(weight[layer].tolist(), other[layer].tolist(), 8)
        assert float(row[2]) == pytest.approx(want, abs=5e-4)
    write_stats(tmp_path / "wrong", skewed_stats(3, 20, seed=1))
    code, _, err = run_main(capsys, "inspect", path, "--stats", tmp_path / "wrong")
    assert code == 1 and "has 3 layers and 16 experts but" in err
    code, _, err = run_main(capsys, "inspect", path, "--num_gpus", "4")
    assert code == 2 and "--num_gpus is 4 but" in err
    code, _, err = run_main(capsys, "inspect", path, "--layer", "3")
    assert code == 2 and "--layer must be in [0, 3)" in err
    code, _, err = run_main(capsys, "inspect", folder)
    assert code == 1 and "not an expert map" in err


def test_inspect_plot(tmp_path, capsys, inspected, monkeypatch):
    pytest.importorskip("matplotlib")  # an optional extra; the missing case is tested below
    _, _, folder, path = inspected
    code, out, _ = run_main(
        capsys, "inspect", path, "--stats", folder, "--plot", tmp_path / "p.png"
    )
    assert code == 0 and f"wrote {tmp_path / 'p.png'}" in out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code, _, err = run_main(capsys, "inspect", path, "--plot", tmp_path / "q.png")
    assert code == 1 and "--plot needs matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "q.png").exists()


# ----------------------------------------------------------------------------------- convert


def test_convert_round_trips(tmp_path, capsys, inspected):
    _, phy2log, folder, path = inspected
    code, out, _ = run_main(capsys, "convert", path, tmp_path / "sg.json")
    assert code == 0 and "(mindspeed-map) -> " in out and "(sglang-map)" in out
    assert torch.equal(eplb.load_sglang_map(tmp_path / "sg.json"), phy2log)
    code, _, err = run_main(capsys, "convert", tmp_path / "sg.json", tmp_path / "back.json")
    assert code == 2 and "give --num_gpus" in err
    code, _, err = run_main(
        capsys, "convert", tmp_path / "sg.json", tmp_path / "back.json", "--num_gpus", "7"
    )
    assert code == 2 and "does not divide" in err
    code, _, _ = run_main(
        capsys, "convert", tmp_path / "sg.json", tmp_path / "back.json", "--num_gpus", "8"
    )
    assert code == 0 and (tmp_path / "back.json").read_bytes() == path.read_bytes()
    code, _, _ = run_main(capsys, "convert", folder, tmp_path / "stats.pt", "--to", "sglang")
    assert code == 0
    assert torch.equal(eplb.load_stats(tmp_path / "stats.pt"), eplb.load_stats(folder))
    code, _, err = run_main(capsys, "convert", tmp_path / "nothing.json", tmp_path / "x.json")
    assert code == 1 and "No such file" in err


# ------------------------------------------------------------------------------ conventions


def test_help_on_every_subcommand(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for name, _, _ in cli.SUBCOMMANDS:
        assert name in out
        code, sub_out, _ = run_main(capsys, name, "--help")
        assert code == 0 and sub_out.startswith(f"usage: eplb {name}") and "--quiet" in sub_out
    _, gen_help, _ = run_main(capsys, "generate-map", "--help")
    for flag in ["--json_folder", "--num_replicas", "--num_groups", "--num_nodes", "--num_gpus"]:
        assert flag in gen_help
    assert "--output_path" in gen_help and "--old_map" in gen_help


def test_no_subcommand_is_a_usage_error(capsys):
    code, _, err = run_main(capsys)
    assert code == 2 and "usage: eplb" in err
    code, _, err = run_main(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def _add_hello(parser: argparse.ArgumentParser) -> None:
    """Say hello (a subcommand registered by module path, as eplb recommend would be).

    Longer description.
    """
    parser.add_argument("--mode", default="ok")


def _run_hello(args: argparse.Namespace) -> int:
    if args.mode == "usage":
        raise cli.UsageError("bad combination")
    if args.mode == "fail":
        raise cli.CommandError("cannot")
    if not args.quiet:
        print("hello")
    return 0


def test_one_line_adds_a_subcommand(monkeypatch, capsys):
    entry = ("hello", f"{__name__}:_add_hello", f"{__name__}:_run_hello")
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, entry])
    assert run_main(capsys, "hello") == (0, "hello\n", "")
    assert run_main(capsys, "hello", "-q") == (0, "", "")
    code, out, _ = run_main(capsys, "--help")
    assert "Say hello (a subcommand registered by module path" in out
    code, _, err = run_main(capsys, "hello", "--mode", "usage")
    assert code == 2 and "usage: eplb hello" in err and "error: bad combination" in err
    code, _, err = run_main(capsys, "hello", "--mode", "fail")
    assert (code, err) == (1, "eplb hello: error: cannot\n")
