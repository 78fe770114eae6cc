"""How many redundant experts to deploy, and whether a layout works at all.

* :func:`recommend_redundancy` runs the balancer on load statistics for several numbers of
  redundant experts and reports the balancedness each reaches and the memory it costs.
* :func:`check_layout` lists what is wrong (errors) or unwise (warnings) with a layout before any
  statistics exist.
* ``eplb recommend`` (:func:`add_recommend_arguments`, :func:`run_recommend`) prints the table
  of :func:`recommend_redundancy` for a statistics file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from eplb.algorithm import POLICIES, rebalance_experts
from eplb.checks import int_tensor, loads, positive_int
from eplb.metrics import balancedness, gpu_loads

__all__ = [
    "LayoutReport",
    "RedundancyRecommendation",
    "RedundancyRow",
    "add_recommend_arguments",
    "check_layout",
    "recommend_redundancy",
    "run_recommend",
]


@dataclass(frozen=True)
class RedundancyRow:
    """One candidate of :func:`recommend_redundancy`.

    Attributes:
        num_redundant: redundant experts (physical slots beyond the logical experts).
        num_replicas: physical experts per layer, ``E + num_redundant``.
        mean_balancedness: mean over layers of mean GPU load / max GPU load (1 = perfect).
        worst_balancedness: the lowest layer's balancedness.
        extra_experts_per_gpu: additional expert weights each GPU stores,
            ``num_redundant / num_gpus``.
    """

    num_redundant: int
    num_replicas: int
    mean_balancedness: float
    worst_balancedness: float
    extra_experts_per_gpu: int


@dataclass(frozen=True)
class RedundancyRecommendation:
    """Result of :func:`recommend_redundancy`.

    Attributes:
        rows: one row per candidate, in ascending ``num_redundant``.
        pick: the row with the fewest redundant experts whose mean balancedness is within
            ``tolerance`` of the best row's.
        tolerance: that absolute tolerance on mean balancedness.
        policy: the balancer policy used.
    """

    rows: tuple[RedundancyRow, ...]
    pick: RedundancyRow
    tolerance: float
    policy: str

    def table(self) -> str:
        """The rows as a fixed-width text table, the pick marked with ``*``."""
        head = (
            f"{'redundant':>9}  {'replicas':>8}  {'extra/GPU':>9}  {'mean bal.':>9}  "
            f"{'worst bal.':>10}"
        )
        lines = [head, "-" * len(head)]
        for row in self.rows:
            mark = "  *" if row == self.pick else ""
            lines.append(
                f"{row.num_redundant:>9}  {row.num_replicas:>8}  {row.extra_experts_per_gpu:>9}  "
                f"{row.mean_balancedness:>9.4f}  {row.worst_balancedness:>10.4f}{mark}"
            )
        lines.append(
            f"* pick: {self.pick.num_redundant} redundant experts (fewest within "
            f"{self.tolerance:g} of the best mean balancedness, policy {self.policy!r})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary: rows, pick, tolerance and policy."""
        return {
            "policy": self.policy,
            "tolerance": self.tolerance,
            "pick": asdict(self.pick),
            "rows": [asdict(row) for row in self.rows],
        }


def _checked_candidates(candidates: object, num_gpus: int) -> list[int]:
    """Sorted, distinct non-negative multiples of ``num_gpus``."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a sequence of ints, got {candidates!r}")
    if len(candidates) == 0:
        raise ValueError("candidates must not be empty")
    values = int_tensor("candidates", list(candidates), convert=True).reshape(-1)
    bad = (values < 0) | (values % num_gpus != 0)
    if bool(bad.any()):
        raise ValueError(
            f"every candidate must be a non-negative multiple of num_gpus={num_gpus} (each "
            f"GPU gets the same number of extra experts), got {int(values[bad][0])}"
        )
    return sorted(set(values.tolist()))


def recommend_redundancy(
    stats: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    num_groups: int,
    candidates: Sequence[int],
    *,
    tolerance: float = 0.01,
    policy: str = "balanced",
) -> RedundancyRecommendation:
    """Balance reachable with each candidate number of redundant experts.

    For each candidate ``r`` runs ``rebalance_experts(stats, E + r, num_groups, num_nodes,
    num_gpus, policy=policy)`` and measures the placement on ``stats`` itself
    (``balancedness(gpu_loads(stats, phy2log, num_gpus))``).

    The balancers are heuristics: once balancedness saturates (close to 1 for the global policy,
    or at the cap a hierarchical policy's groups-to-nodes packing sets) more redundancy can lower
    it slightly (docs/runtime.md gives measured sizes), hence the tolerance of the pick.

    Args:
        stats: [L, E] load statistics (token counts), any device, int or float, finite, >= 0.
        num_gpus: GPUs; must divide ``E + r`` for every candidate.
        num_nodes: server nodes (hierarchical policy when ``num_nodes`` divides ``num_groups``).
        num_groups: expert groups.
        candidates: numbers of redundant experts to try, each a non-negative multiple of
            ``num_gpus``; duplicates are dropped and the rows sorted.
        tolerance: absolute slack on mean balancedness for the pick, in [0, 1].
        policy: ``"balanced"`` (default) or ``"deepseek"``.

    Returns:
        A :class:`RedundancyRecommendation` (rows, pick).

    Raises:
        ValueError / TypeError: bad statistics, a candidate that is not a multiple of
        ``num_gpus``, or a layout the balancer rejects (the message names the candidate).
    """
    w = loads("stats", stats, ndim=2).to(torch.float64)
    num_gpus = positive_int("num_gpus", num_gpus)
    num_nodes = positive_int("num_nodes", num_nodes)
    num_groups = positive_int("num_groups", num_groups)
    values = _checked_candidates(candidates, num_gpus)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a float, got {tolerance!r}")
    if not 0.0 <= float(tolerance) <= 1.0:
        raise ValueError(f"tolerance must be in [0, 1], got {tolerance!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    num_experts = w.shape[1]
    if num_experts % num_gpus:
        raise ValueError(
            f"the {num_experts} experts are not a multiple of num_gpus={num_gpus}, so no multiple "
            "of num_gpus redundant experts fills the GPUs evenly"
        )
    rows = []
    for r in values:
        try:
            phy2log = rebalance_experts(
                w, num_experts + r, num_groups, num_nodes, num_gpus, policy=policy
            )[0]
        except ValueError as err:
            raise type(err)(f"{r} redundant experts: {err}") from err
        bal = balancedness(gpu_loads(w, phy2log, num_gpus))
        rows.append(
            RedundancyRow(
                num_redundant=r,
                num_replicas=num_experts + r,
                mean_balancedness=float(bal.mean()),
                worst_balancedness=float(bal.min()),
                extra_experts_per_gpu=r // num_gpus,
            )
        )
    best = max(row.mean_balancedness for row in rows)
    pick = next(row for row in rows if row.mean_balancedness >= best - tolerance)
    return RedundancyRecommendation(tuple(rows), pick, float(tolerance), policy)


@dataclass
class LayoutReport:
    """Result of :func:`check_layout`.

    Attributes:
        errors: problems that make ``rebalance_experts`` refuse the layout.
        warnings: layouts that work but lose something (balance, topology, memory).
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def __str__(self) -> str:
        lines = [f"error: {m}" for m in self.errors] + [f"warning: {m}" for m in self.warnings]
        return "\n".join(lines) if lines else "layout ok"


def check_layout(
    num_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str | None = None,
) -> LayoutReport:
    """Problems of an expert-parallel layout, without statistics.

    Args:
        num_experts: E, logical experts per layer.
        num_replicas: R, physical experts per layer (E plus the redundant ones).
        num_groups: expert groups.
        num_nodes: server nodes.
        num_gpus: GPUs in total.
        policy: the policy that will run (``"balanced"`` / ``"deepseek"``); with ``None`` a
            layout ``"balanced"`` cannot serve is a warning, with ``"balanced"`` an error.

    Returns:
        A :class:`LayoutReport`: ``errors`` (``rebalance_experts`` refuses the layout) and
        ``warnings``, each a list of messages that say what to change.

    Raises:
        TypeError / ValueError: an argument that is not a positive int, or an unknown policy.
    """
    e = positive_int("num_experts", num_experts)
    r = positive_int("num_replicas", num_replicas)
    groups = positive_int("num_groups", num_groups)
    nodes = positive_int("num_nodes", num_nodes)
    gpus = positive_int("num_gpus", num_gpus)
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES} or None, got {policy!r}")
    report = LayoutReport()
    err, warn = report.errors.append, report.warnings.append

    if gpus > r:
        err(
            f"more GPUs ({gpus}) than physical experts ({r}): some GPU would hold no expert; use "
            f"num_replicas >= num_gpus (e.g. {gpus * -(-e // gpus)})"
        )
    elif r % gpus:
        up = r + gpus - r % gpus
        err(
            f"num_replicas={r} is not a multiple of num_gpus={gpus}: every GPU holds the same "
            f"number of experts; use {r - r % gpus if r - r % gpus >= e else up} or {up}"
        )
    if r < e:
        err(f"num_replicas={r} is below num_experts={e}: every expert needs at least one slot")
    hierarchical = groups % nodes == 0
    if gpus % nodes:
        msg = f"num_gpus={gpus} is not a multiple of num_nodes={nodes}: nodes must be equal"
        if hierarchical:
            err(msg)
        else:  # the global policy ignores nodes, so the balancer accepts it
            warn(msg + " (the global policy ignores nodes)")
    if hierarchical and e % groups:
        err(
            f"num_groups={groups} does not divide num_experts={e}: groups are equal runs of "
            "consecutive experts"
        )
    if not hierarchical:
        warn(
            f"num_groups={groups} is not a multiple of num_nodes={nodes}: the hierarchical "
            "policy is off and the global one ignores groups and nodes, so experts of one group "
            "may spread over nodes (more inter-node traffic for group-limited routing)"
        )
    if gpus % nodes == 0:
        per_node = gpus // nodes
        if per_node & (per_node - 1):
            warn(
                f"{per_node} GPUs per node is not a power of two: node topologies (NVLink "
                "domains, NUMA halves) are powers of two, so GPUs of one node may not be "
                "equally connected"
            )
    if r == e and not report.errors:
        warn(
            "no redundant experts (num_replicas == num_experts): the balancer can only move "
            "experts, not split a hot one; a few multiples of num_gpus extra usually help most"
        )
    if gpus == 1:
        warn("a single GPU: there is nothing to balance between GPUs")
    if not report.errors:
        experts_per_node = e // nodes if hierarchical else e
        per_gpu = r // gpus
        if per_gpu > experts_per_node:
            msg = (
                f"{per_gpu} slots per GPU exceed the {experts_per_node} experts a GPU can draw "
                f"from ({'per node' if hierarchical and nodes > 1 else 'in all'}), so some GPU "
                "must hold an expert twice"
            )
            if policy == "balanced":
                err(msg + "; policy='balanced' refuses this, use fewer replicas")
            else:
                warn(msg + "; policy='balanced' is unavailable and 'deepseek' wastes the slot")
    return report


# ------------------------------------------------------------------------------- command line


_STATS_HELP = "token_collects_all.json's folder, or a MindSpeed-RL / SGLang statistics file"


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    """Balancedness reachable with each number of redundant experts, and a pick.

    Runs the balancer on the statistics once per candidate number of redundant experts
    (multiples of --num_gpus) and prints, per candidate, the mean and worst-layer balancedness
    (mean GPU load / max GPU load, 1.0 is perfect) and the extra experts each GPU stores. The pick
    (*) is the fewest redundant experts within --tolerance of the best mean balancedness.
    """
    parser.add_argument(
        "--json_folder", "--json-folder", required=True, metavar="DIR", help=_STATS_HELP
    )
    parser.add_argument(
        "--num_gpus", "--num-gpus", required=True, type=int, metavar="P", help="GPUs in total"
    )
    parser.add_argument(
        "--num_nodes", "--num-nodes", type=int, default=1, metavar="M", help="nodes (default 1)"
    )
    parser.add_argument(
        "--num_groups",
        "--num-groups",
        type=int,
        default=1,
        metavar="G",
        help="expert groups (default 1)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        metavar="N",
        help="redundant-expert counts to try, multiples of --num_gpus (default: 0 to 4 times "
        "--num_gpus, those the policy accepts)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="slack on mean balancedness for the pick (default 0.01)",
    )
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default="balanced",
        help="balanced (default): no expert twice on a GPU; deepseek: DeepSeek's eplb.py exactly",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_recommend(args: argparse.Namespace) -> int:
    """Run ``eplb recommend``: print the table (or JSON); returns 0.

    A bad flag raises ``eplb.cli.UsageError`` (exit 2), an unreadable file ``ValueError``.
    """
    from eplb.cli import UsageError
    from eplb.mapfile import load_stats

    for name in ("num_gpus", "num_nodes", "num_groups"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    stats = load_stats(args.json_folder)
    num_layers, num_experts = stats.shape
    candidates = args.candidates
    if candidates is None:
        candidates = [
            k * args.num_gpus
            for k in range(5)
            if check_layout(
                num_experts,
                num_experts + k * args.num_gpus,
                args.num_groups,
                args.num_nodes,
                args.num_gpus,
                policy=args.policy,
            ).ok
        ]
        if not candidates:
            report = check_layout(
                num_experts,
                num_experts,
                args.num_groups,
                args.num_nodes,
                args.num_gpus,
                policy=args.policy,
            )
            raise UsageError(f"no candidate fits this layout: {'; '.join(report.errors)}")
    try:
        result = recommend_redundancy(
            stats,
            args.num_gpus,
            args.num_nodes,
            args.num_groups,
            candidates,
            tolerance=args.tolerance,
            policy=args.policy,
        )
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    if not getattr(args, "quiet", False):
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            print(f"{num_layers} layers, {num_experts} experts, {args.num_gpus} GPUs")
            print(result.table())
    return 0
