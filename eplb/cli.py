"""The ``eplb`` command (also ``python -m eplb``); docs/cli.md is its manual.

Subcommands are the entries of :data:`SUBCOMMANDS`, ``(name, add_arguments, run)``:

* ``add_arguments(parser)`` declares the subcommand's options on an ``argparse`` parser that
  already has ``--quiet``; the first line of its docstring is the subcommand's one-line help and
  the whole docstring its ``--help`` description.
* ``run(args) -> int | None`` does the work and returns the exit code (None means 0). It raises
  :class:`UsageError` for a command line that cannot work, flags that do not fit the files
  included (exit 2), and ``ValueError`` / ``OSError`` / :class:`CommandError` for a file that
  cannot be read or written or another failure (exit 1); the message goes to stderr, never a
  traceback.

Either function may be given as a ``"module:function"`` string, imported when the parser is
built, so a module elsewhere in ``eplb`` adds a subcommand with one line here, e.g.
``("recommend", "eplb.recommend:add_arguments", "eplb.recommend:run"),`` and can itself import
``UsageError`` / ``CommandError`` from this module without an import cycle.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from eplb.algorithm import POLICIES, rebalance_experts
from eplb.checks import LayoutError
from eplb.fileio import atomic_write_bytes
from eplb.mapfile import (
    FORMATS,
    convert_file,
    detect_format,
    load_map,
    load_stats,
    save_expert_map,
    save_sglang_map,
)
from eplb.maps import expert_counts
from eplb.metrics import balancedness, count_duplicate_rows, gpu_loads

__all__ = [
    "SUBCOMMANDS",
    "CommandError",
    "UsageError",
    "add_json_folder_argument",
    "build_parser",
    "identity_placement",
    "main",
]


class UsageError(Exception):
    """The command line cannot work (bad flag combination, flags that do not fit the files)."""


class CommandError(Exception):
    """The command cannot complete for another reason than a bad file (e.g. a missing extra)."""


AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], "int | None"]


# ------------------------------------------------------------------------------- helpers


def positive_arg(text: str) -> int:
    """``argparse`` type: a positive integer (also used by ``python -m lplb.demo``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet:
        print(text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned plain-text table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _progress(args: argparse.Namespace, total: int, desc: str) -> Any:
    """A tqdm bar on stderr that appears only when the loop runs longer than a second."""
    return tqdm(total=total, desc=desc, unit="layer", delay=1.0, disable=args.quiet, leave=False)


def identity_placement(num_layers: int, num_experts: int, num_gpus: int) -> torch.Tensor | None:
    """The placement without replication: expert ``e`` on GPU ``e // (E / P)``.

    Returns:
        phy2log [L, E] int64 (``phy2log[l, e] = e``), or None when ``num_gpus`` does not divide
        ``num_experts`` (no such placement exists).
    """
    if num_experts % num_gpus:
        return None
    return torch.arange(num_experts, dtype=torch.int64).repeat(num_layers, 1)


def _check_fits(phy2log: torch.Tensor, weight: torch.Tensor, what: str, stats: str) -> None:
    """``phy2log`` (a map read from ``what``) must cover the layers and experts of ``weight``."""
    num_layers, num_experts = weight.shape
    map_experts = int(phy2log.max()) + 1
    if phy2log.shape[0] != num_layers or map_experts != num_experts:
        raise ValueError(
            f"{what} has {phy2log.shape[0]} layers and {map_experts} experts but {stats} has "
            f"{num_layers} layers and {num_experts} experts"
        )


def _map_gpus(path: str, file_gpus: int | None, flag_gpus: int | None) -> int:
    """The device count of a map: the file's (MindSpeed-RL) or ``--num_gpus`` (SGLang)."""
    if file_gpus is None:
        if flag_gpus is None:
            raise UsageError(f"{path} is an SGLang map, which has no device count: give --num_gpus")
        return flag_gpus
    if flag_gpus is not None and flag_gpus != file_gpus:
        raise UsageError(f"--num_gpus is {flag_gpus} but {path} has {file_gpus} devices")
    return file_gpus


# -------------------------------------------------------------------------- generate-map


def add_json_folder_argument(parser: argparse.ArgumentParser) -> None:
    """MindSpeed-RL's required ``--json_folder`` (statistics to read with ``load_stats``)."""
    parser.add_argument(
        "--json_folder",
        "--json-folder",
        required=True,
        metavar="DIR",
        help="folder holding token_collects_all.json (or a statistics file: MindSpeed-RL JSON "
        "or an SGLang dump)",
    )


def add_generate_map(parser: argparse.ArgumentParser) -> None:
    """Build an expert map from token statistics (MindSpeed-RL's map generator).

    Reads the statistics, replicates and places the experts with rebalance_experts, writes the
    map, and prints per layer the balancedness (mean GPU load / max GPU load) before and after,
    the GPU rows holding an expert twice, and the slots moved from --old_map. "Before" is the
    --old_map placement when given, else expert e on GPU e // (E / num_gpus) without copies
    (n/a when num_gpus does not divide E).
    """
    add_json_folder_argument(parser)
    parser.add_argument(
        "--num_replicas",
        "--num-replicas",
        required=True,
        type=positive_arg,
        metavar="N",
        help="physical experts per layer, originals included",
    )
    parser.add_argument(
        "--num_groups",
        "--num-groups",
        required=True,
        type=positive_arg,
        metavar="G",
        help="expert groups (must divide the experts)",
    )
    parser.add_argument(
        "--num_nodes",
        "--num-nodes",
        required=True,
        type=positive_arg,
        metavar="M",
        help="server nodes (must divide --num_gpus)",
    )
    parser.add_argument(
        "--num_gpus",
        "--num-gpus",
        required=True,
        type=positive_arg,
        metavar="P",
        help="GPUs (devices) in expert parallelism",
    )
    parser.add_argument(
        "--output_path",
        "--output-path",
        required=True,
        metavar="FILE",
        help="the map file to write",
    )
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default="balanced",
        help="balanced (default): no expert twice on a GPU; deepseek: DeepSeek's eplb.py exactly",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="mindspeed",
        help="mindspeed (default): MindSpeed-RL expert map; sglang: --init-expert-location JSON",
    )
    parser.add_argument(
        "--old_map",
        "--old-map",
        metavar="FILE",
        help="the map in use now (either format): experts stay where that costs no balance",
    )


def run_generate_map(args: argparse.Namespace) -> int:
    weight = load_stats(args.json_folder)
    num_layers, num_experts = weight.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"{args.json_folder}: the statistics hold no layers or no experts")
    num_gpus, num_replicas = args.num_gpus, args.num_replicas
    old = None
    if args.old_map is not None:
        if args.policy != "balanced":
            raise UsageError("--old_map needs --policy balanced")
        old, old_gpus = load_map(args.old_map)
        _map_gpus(args.old_map, old_gpus, num_gpus)
        if old.shape[1] != num_replicas:
            raise UsageError(
                f"--old_map has {old.shape[1]} slots per layer but --num_replicas is {num_replicas}"
            )
        _check_fits(old, weight, args.old_map, args.json_folder)

    rows, changed = [], []
    with _progress(args, num_layers, "rebalance") as bar:
        for layer in range(num_layers):
            try:
                out = rebalance_experts(
                    weight[layer : layer + 1],
                    num_replicas,
                    args.num_groups,
                    args.num_nodes,
                    num_gpus,
                    policy=args.policy,
                    old_phy2log=None if old is None else old[layer : layer + 1],
                )
            except ValueError as exc:  # the statistics are valid: the flags do not fit them
                raise UsageError(f"{exc} (statistics: {num_experts} experts)") from None
            rows.append(out[0])
            if old is not None:
                changed.append(out[3])
            bar.update()
    phy2log = torch.cat(rows)

    per_row_dups = [count_duplicate_rows(phy2log[layer], num_gpus) for layer in range(num_layers)]
    if args.format == "mindspeed":
        if sum(per_row_dups):
            raise UsageError(
                f"--policy {args.policy} put an expert twice on one GPU in {sum(per_row_dups)} "
                "GPU rows, which the mindspeed format forbids: use --policy balanced or "
                "--format sglang"
            )
        save_expert_map(args.output_path, phy2log, num_gpus)
    else:
        save_sglang_map(args.output_path, phy2log)

    before_map = old if old is not None else identity_placement(num_layers, num_experts, num_gpus)
    before = None if before_map is None else balancedness(gpu_loads(weight, before_map, num_gpus))
    after = balancedness(gpu_loads(weight, phy2log, num_gpus))
    moved = torch.cat(changed) if changed else None
    table = [
        [
            layer,
            _fmt(None if before is None else float(before[layer])),
            _fmt(float(after[layer])),
            per_row_dups[layer],
            "-" if moved is None else int(moved[layer]),
        ]
        for layer in range(num_layers)
    ]
    _say(args, _table(["layer", "before", "after", "dup_gpus", "moved"], table))
    summary = (
        f"wrote {args.output_path} ({args.format}): {num_layers} layers, {num_experts} experts "
        f"-> {num_replicas} slots on {num_gpus} GPUs; balancedness "
        f"{_fmt(None if before is None else float(before.mean()))} -> "
        f"{_fmt(float(after.mean()))} (mean over layers, worst {_fmt(float(after.min()))}); "
        f"{sum(per_row_dups)} GPU rows with a repeated expert"
    )
    if moved is not None:
        summary += f"; {int(moved.sum())} of {num_layers * num_replicas} slots moved"
    _say(args, summary)
    return 0


# ------------------------------------------------------------------------------- inspect


def add_inspect(parser: argparse.ArgumentParser) -> None:
    """Show the per-layer and per-GPU load of an expert map under given statistics.

    Without --stats every expert carries load 1. Balancedness = mean GPU load / max GPU load
    (1.0 is perfect); a copy of an expert carries its load divided by its number of copies.
    """
    parser.add_argument("map", help="expert map, MindSpeed-RL or SGLang format")
    parser.add_argument(
        "--stats", metavar="FILE", help="statistics file or folder (MindSpeed-RL or SGLang)"
    )
    parser.add_argument(
        "--num_gpus",
        "--num-gpus",
        type=positive_arg,
        metavar="P",
        help="GPUs; needed for an SGLang map, must match a MindSpeed-RL map's device count",
    )
    parser.add_argument(
        "--before",
        metavar="MAP",
        help="map to compare with (default: expert e on GPU e // (E / P), without copies)",
    )
    parser.add_argument("--layer", type=int, help="also list the experts and load of every GPU")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw per-GPU load and per-layer balancedness, before and after (needs matplotlib)",
    )


def run_inspect(args: argparse.Namespace) -> int:
    phy2log, file_gpus = load_map(args.map)
    num_gpus = _map_gpus(args.map, file_gpus, args.num_gpus)
    num_layers, num_slots = phy2log.shape
    if num_slots % num_gpus:
        raise UsageError(f"--num_gpus {num_gpus} does not divide the {num_slots} slots per layer")
    num_experts = int(phy2log.max()) + 1
    if args.stats is None:
        weight = torch.ones(num_layers, num_experts, dtype=torch.int64)
    else:
        weight = load_stats(args.stats)
        _check_fits(phy2log, weight, args.map, args.stats)
    if args.layer is not None and not 0 <= args.layer < num_layers:
        raise UsageError(f"--layer must be in [0, {num_layers}), got {args.layer}")
    if args.before is not None:
        before_map, before_gpus = load_map(args.before)
        _map_gpus(args.before, before_gpus, num_gpus)
        if before_map.shape[1] % num_gpus:
            raise UsageError(f"{num_gpus} GPUs do not divide the slots of {args.before}")
        _check_fits(before_map, weight, args.before, args.stats or args.map)
    else:
        before_map = identity_placement(num_layers, num_experts, num_gpus)

    loads = gpu_loads(weight, phy2log, num_gpus)  # [L, P] float64
    bal = balancedness(loads)
    before_loads = None if before_map is None else gpu_loads(weight, before_map, num_gpus)
    before_bal = None if before_loads is None else balancedness(before_loads)
    copies = expert_counts(phy2log, num_experts)  # [L, E]

    layer_rows = [
        [
            layer,
            _fmt(float(bal[layer])),
            _fmt(None if before_bal is None else float(before_bal[layer])),
            f"{float(loads[layer].max()):.1f}",
            f"{float(loads[layer].mean()):.1f}",
            int(loads[layer].argmax()),
            count_duplicate_rows(phy2log[layer], num_gpus),
            int((copies[layer] > 1).sum()),
        ]
        for layer in range(num_layers)
    ]
    _say(
        args,
        _table(
            [
                "layer",
                "balance",
                "before",
                "max_load",
                "mean_load",
                "max_gpu",
                "dup_gpus",
                "copied",
            ],
            layer_rows,
        ),
    )
    heaviest = torch.bincount(loads.argmax(1), minlength=num_gpus)
    gpu_rows = [
        [
            gpu,
            f"{float(loads[:, gpu].sum()):.1f}",
            f"{float(loads[:, gpu].mean()):.1f}",
            f"{float(loads[:, gpu].max()):.1f}",
            int(heaviest[gpu]),
        ]
        for gpu in range(num_gpus)
    ]
    _say(args)
    _say(args, _table(["gpu", "total_load", "mean_load", "max_load", "heaviest_in"], gpu_rows))
    if args.layer is not None:
        per = num_slots // num_gpus
        experts = phy2log[args.layer].reshape(num_gpus, per).tolist()
        rows = [
            [gpu, f"{float(loads[args.layer, gpu]):.1f}", " ".join(map(str, experts[gpu]))]
            for gpu in range(num_gpus)
        ]
        _say(args)
        _say(args, f"layer {args.layer}:")
        _say(args, _table(["gpu", "load", "experts"], rows))
    worst = int(bal.argmin())
    _say(args)
    _say(
        args,
        f"{args.map}: {num_layers} layers, {num_experts} experts, {num_slots} slots on "
        f"{num_gpus} GPUs; balancedness {_fmt(float(bal.mean()))} (mean over layers, worst "
        f"{_fmt(float(bal[worst]))} at layer {worst}); before "
        f"{_fmt(None if before_bal is None else float(before_bal.mean()))}",
    )
    if args.plot is not None:
        _plot(args.plot, loads, before_loads, bal, before_bal)
        _say(args, f"wrote {args.plot}")
    return 0


def _plot(
    path: str,
    loads: torch.Tensor,
    before_loads: torch.Tensor | None,
    bal: torch.Tensor,
    before_bal: torch.Tensor | None,
) -> None:
    """Per-GPU load (summed over layers) and per-layer balancedness, before and after."""
    try:
        import matplotlib
    except ImportError:
        raise CommandError(
            "--plot needs matplotlib, an optional extra: pip install 'moe-lplb[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    num_layers, num_gpus = loads.shape
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * num_gpus + 3), 7))
    x = torch.arange(num_gpus).numpy()
    if before_loads is not None:
        top.bar(x - 0.2, before_loads.sum(0).numpy(), 0.4, label="before")
        top.bar(x + 0.2, loads.sum(0).numpy(), 0.4, label="after")
    else:
        top.bar(x, loads.sum(0).numpy(), 0.6, label="after")
    top.axhline(float(loads.sum(0).mean()), color="gray", linestyle="--", label="mean")
    top.set_xlabel("GPU")
    top.set_ylabel("load, summed over layers")
    top.legend()
    layers = range(num_layers)
    if before_bal is not None:
        bottom.plot(layers, before_bal.numpy(), marker=".", label="before")
    bottom.plot(layers, bal.numpy(), marker=".", label="after")
    bottom.set_ylim(0, 1.05)
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_xlabel("layer")
    bottom.set_ylabel("balancedness (mean / max GPU load)")
    bottom.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else "png"
    try:
        fig.savefig(buffer, format=suffix)
    except ValueError as exc:
        raise UsageError(f"--plot: {exc}") from None
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------- convert


def add_convert(parser: argparse.ArgumentParser) -> None:
    """Convert statistics or an expert map between the MindSpeed-RL and SGLang formats.

    The input's kind (statistics or map, and its format) is read from its content; statistics
    stay statistics and maps stay maps.
    """
    parser.add_argument("input", help="file (or statistics folder) to convert")
    parser.add_argument("output", help="file to write (.json; .pt for SGLang torch files)")
    parser.add_argument("--to", choices=FORMATS, help="output format (default: the other one)")
    parser.add_argument(
        "--num_gpus",
        "--num-gpus",
        type=positive_arg,
        metavar="P",
        help="devices of a MindSpeed-RL map written from an SGLang map",
    )


def run_convert(args: argparse.Namespace) -> int:
    kind = detect_format(args.input)
    family, what = kind.split("-")
    to = args.to or ("sglang" if family == "mindspeed" else "mindspeed")
    if what == "map" and to == "mindspeed":
        phy2log, file_gpus = load_map(args.input)
        gpus = _map_gpus(args.input, file_gpus, args.num_gpus)
        if phy2log.shape[1] % gpus:
            raise UsageError(f"--num_gpus {gpus} does not divide the {phy2log.shape[1]} slots")
    try:
        written = convert_file(args.input, args.output, to=to, num_gpus=args.num_gpus)
    except LayoutError as exc:
        raise UsageError(str(exc)) from None
    _say(args, f"{args.input} ({kind}) -> {args.output} ({written})")
    return 0


# ---------------------------------------------------------------------------------- main

# (name, add_arguments, run); see the module docstring. Add a subcommand with one line here.
SUBCOMMANDS: list[tuple[str, AddArguments | str, Run | str]] = [
    ("generate-map", add_generate_map, run_generate_map),
    ("inspect", add_inspect, run_inspect),
    ("convert", add_convert, run_convert),
    ("recommend", "eplb.recommend:add_recommend_arguments", "eplb.recommend:run_recommend"),
]


def _resolve(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """A function, or the function a ``"module:function"`` string names."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``eplb`` parser and the parser of every subcommand, by name."""
    parser = argparse.ArgumentParser(
        prog="eplb",
        description="Expert-parallel load balancing: statistics, expert maps, conversions.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    # SUPPRESS: "eplb --quiet CMD" must not be reset by the subcommand's own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, add_ref, run_ref in SUBCOMMANDS:
        add_arguments = _resolve(add_ref)
        doc = inspect.cleandoc(add_arguments.__doc__ or "")
        sub = commands.add_parser(
            name,
            parents=[common],
            help=doc.splitlines()[0] if doc else None,
            description=doc or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(sub)
        sub.set_defaults(run=_resolve(run_ref))
        subparsers[name] = sub
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eplb`` command line; returns the exit code (0 ok, 1 bad file, 2 usage)."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors, 0 after --help
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prefix = f"eplb {args.command}: error:"
    try:
        code = args.run(args)
    except UsageError as exc:
        subparsers[args.command].print_usage(sys.stderr)
        print(f"{prefix} {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, CommandError) as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if code is None else int(code)
