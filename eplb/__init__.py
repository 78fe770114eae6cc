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
from eplb.analyzer import MoEAnalyzer, load_imbalance
from eplb.checks import LayoutError
from eplb.manager import Rebalance, RebalanceEvent, RebalanceManager
from eplb.mapfile import (
    convert_file,
    detect_format,
    expert_map_to_json,
    load_expert_map,
    load_map,
    load_sglang_map,
    load_sglang_stats,
    load_stats,
    load_token_stats,
    parse_expert_map,
    save_expert_map,
    save_sglang_map,
    save_sglang_stats,
    save_token_stats,
)
from eplb.maps import log2phy_from_ranks, phy2log_to_log2phy
from eplb.metrics import (
    balancedness,
    coefficient_of_variation,
    count_duplicate_rows,
    gpu_loads,
    normalized_variance,
)
from eplb.move_async import ExpertMover
from eplb.move_exec import ExpertMoveError, MoveStats, move_experts
from eplb.move_peer import release_staging
from eplb.move_plan import MovePlan, min_move_bytes, plan_moves
from eplb.recommend import (
    LayoutReport,
    RedundancyRecommendation,
    RedundancyRow,
    check_layout,
    recommend_redundancy,
)
from eplb.stats import TokenCollector
from eplb.trackers import EWMATracker, LoadTracker, StageTracker, WindowTracker

__all__ = [
    "POLICIES",
    "EWMATracker",
    "ExpertMoveError",
    "ExpertMover",
    "LayoutError",
    "LayoutReport",
    "LoadTracker",
    "MoEAnalyzer",
    "MovePlan",
    "MoveStats",
    "Rebalance",
    "RebalanceEvent",
    "RebalanceManager",
    "RedundancyRecommendation",
    "RedundancyRow",
    "StageTracker",
    "TokenCollector",
    "WindowTracker",
    "balanced_packing",
    "balancedness",
    "check_layout",
    "coefficient_of_variation",
    "convert_file",
    "count_duplicate_rows",
    "detect_format",
    "expert_map_to_json",
    "gpu_loads",
    "load_expert_map",
    "load_imbalance",
    "load_map",
    "load_sglang_map",
    "load_sglang_stats",
    "load_stats",
    "load_token_stats",
    "log2phy_from_ranks",
    "min_move_bytes",
    "move_experts",
    "normalized_variance",
    "parse_expert_map",
    "phy2log_to_log2phy",
    "plan_moves",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "recommend_redundancy",
    "release_staging",
    "replicate_experts",
    "save_expert_map",
    "save_sglang_map",
    "save_sglang_stats",
    "save_token_stats",
]
