"""PNG plots of the demo's report (lplb/demo.py). matplotlib is an optional extra: it is imported
when a plot is drawn, and its absence raises ImportError, which the demo reports and survives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report"]

# Colour and line style per strategy key, shared by both plots.
STYLES = {
    "none": ("tab:gray", "-"),
    "eplb": ("tab:blue", "-"),
    "lplb": ("tab:orange", "-"),
    "eplb+lplb": ("tab:green", "-"),
    "optimum_lplb": ("tab:orange", ":"),
    "optimum_eplb+lplb": ("black", ":"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_rank_loads(report: dict[str, Any], path: Path) -> Path:
    """Per-rank token load of one batch: no balancing as bars, the balancers as lines."""
    plt = _pyplot()
    snapshot = report["snapshot"]
    loads = snapshot["rank_loads"]
    labels = {k: v["label"] for k, v in report["strategies"].items()}
    ranks = range(len(loads["none"]))
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.bar(ranks, loads["none"], color="lightgray", label=f"{labels['none']} (before)")
    for key in ("eplb", "lplb", "eplb+lplb"):
        color, _ = STYLES[key]
        ax.plot(ranks, loads[key], color=color, marker="o", markersize=4, label=labels[key])
    ax.axhline(snapshot["mean"], color="black", linestyle="--", linewidth=1, label="mean")
    ax.set_xlabel("EP rank")
    ax.set_ylabel("routed token copies on the rank")
    ax.set_title(f"Per-rank load of batch {snapshot['batch']}, before and after balancing")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=5, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_imbalance(report: dict[str, Any], path: Path) -> Path:
    """max/mean rank load of every batch per strategy, with the rebalance points marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for key, s in report["strategies"].items():
        color, style = STYLES[key]
        values = s["max_over_mean_per_batch"]
        ax.plot(range(len(values)), values, color=color, linestyle=style, label=s["label"])
    for i, rebalance in enumerate(report["rebalances"]):
        ax.axvline(
            rebalance["batch"] + 0.5,
            color="tab:red",
            linewidth=0.8,
            alpha=0.6,
            label="rebalance (manager)" if i == 0 else None,
        )
    ax.set_xlabel("batch")
    ax.set_ylabel("max rank load / mean rank load")
    ax.set_title("Load imbalance over batches (1 is perfect)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Both plots into ``out``; returns their paths. Raises ImportError without matplotlib."""
    _pyplot()
    return [
        plot_rank_loads(report, out / "rank_loads.png"),
        plot_imbalance(report, out / "imbalance.png"),
    ]
