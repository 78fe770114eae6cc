"""lplb: per-batch linear-programming load balancing for MoE expert parallelism."""

from lplb.planner import Planner
from lplb.topology import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, torus_2d, validate_r2o

__all__ = ["CUBE_8P2E", "HYPERCUBE_16P2E", "RING_8P", "Planner", "torus_2d", "validate_r2o"]
