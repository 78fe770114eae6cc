"""eplb: static expert replication and placement for MoE expert parallelism."""

from eplb.algorithm import POLICIES, rebalance_experts
from eplb.metrics import (
    balancedness,
    coefficient_of_variation,
    count_duplicate_rows,
    gpu_loads,
    log2phy_from_ranks,
    normalized_variance,
    phy2log_to_log2phy,
)

__all__ = [
    "POLICIES",
    "balancedness",
    "coefficient_of_variation",
    "count_duplicate_rows",
    "gpu_loads",
    "log2phy_from_ranks",
    "normalized_variance",
    "phy2log_to_log2phy",
    "rebalance_experts",
]
