"""lplb: per-batch linear-programming load balancing for MoE expert parallelism.

Floor 2 of the project (docs/architecture.md): may import ``eplb``, never the other way round.
"""

from lplb import _C
from lplb.planner import Planner
from lplb.topology import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, ring, torus_2d, validate_r2o

if _C.has_cuda:
    from lplb import cuda_ops  # noqa: F401  (registers the CUDA kernels of the ops)

__all__ = [
    "CUBE_8P2E",
    "HYPERCUBE_16P2E",
    "RING_8P",
    "Planner",
    "ring",
    "torus_2d",
    "validate_r2o",
]
