"""eplb: static expert replication and placement for MoE expert parallelism.

Floor 1 of the project (docs/architecture.md): imports nothing of ``lplb``.
"""

from eplb.algorithm import (
    POLICIES,
    balanced_packing,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
)
from eplb.checks import LayoutError
from eplb.maps import log2phy_from_ranks, phy2log_to_log2phy
from eplb.metrics import (
    balancedness,
    coefficient_of_variation,
    count_duplicate_rows,
    gpu_loads,
    normalized_variance,
)

__all__ = [
    "POLICIES",
    "LayoutError",
    "balanced_packing",
    "balancedness",
    "coefficient_of_variation",
    "count_duplicate_rows",
    "gpu_loads",
    "log2phy_from_ranks",
    "normalized_variance",
    "phy2log_to_log2phy",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]
