"""torch.library custom ops of LPLB: the schemas, CPU kernels and fake (meta) implementations.

The schemas are the contract between the Python API and the backends: this module registers
the CPU kernels (lplb/reference.py); lplb/cuda_ops.py registers the CUDA kernels for the same
ops with `torch.library.register_kernel`. The fake implementations let `Planner.run` be traced
by torch.compile(fullgraph=True) and captured in CUDA graphs.
"""

import torch

from lplb import reference

__all__ = ["count_idx", "map_idx", "solve"]


@torch.library.custom_op(
    "lplb::count_idx",
    mutates_args=("error_flag",),
    device_types="cpu",
    schema="(Tensor idx, Tensor(a!) error_flag, int n_logical, int n_sms) -> (Tensor, Tensor)",
)
def count_idx(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per logical expert, overall and as an exclusive prefix over `n_sms` chunks.

    Args:
        idx: any shape, int32/int64, values in [-1, n_logical).
        error_flag: [1] int32; device kernels set it to 1 on an out-of-range index (the CPU
            kernel raises ValueError instead).
        n_logical: number of logical experts E.
        n_sms: number of chunks of the flattened idx.

    Returns:
        workload: [E] int32; workload_by_sm: [n_sms, E] int32.
    """
    return reference.count_idx(idx, n_logical, n_sms)


@count_idx.register_fake
def _(
    idx: torch.Tensor, error_flag: torch.Tensor, n_logical: int, n_sms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        idx.new_empty((n_logical,), dtype=torch.int32),
        idx.new_empty((n_sms, n_logical), dtype=torch.int32),
    )


@torch.library.custom_op(
    "lplb::solve",
    mutates_args=("avail_counter",),
    device_types="cpu",
    schema=(
        "(Tensor workload, Tensor phy2log, Tensor r2o, Tensor o2r, Tensor(a!) avail_counter, "
        "int n_local_logical, int n_local_routed, int n_combined) -> Tensor"
    ),
)
def solve(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
) -> torch.Tensor:
    """Solve the per-group LP (docs/lp.md) and return the shares kept on original ranks.

    Args:
        workload: [E] any int/float dtype, tokens per logical expert (already all-reduced).
        phy2log: [R] int32, logical expert of each physical slot.
        r2o, o2r: [G, D] int32, topology and its column-wise inverse.
        avail_counter: one-element int32/int64, += number of groups that converged.
        n_local_logical, n_local_routed, n_combined: per-rank layout.

    Returns:
        probs: [n_group, G, D] float32 with n_group = R / (G * n_local_routed).
    """
    return reference.solve(
        workload, phy2log, r2o, o2r, avail_counter, n_local_logical, n_local_routed, n_combined
    )


@solve.register_fake
def _(
    workload: torch.Tensor,
    phy2log: torch.Tensor,
    r2o: torch.Tensor,
    o2r: torch.Tensor,
    avail_counter: torch.Tensor,
    n_local_logical: int,
    n_local_routed: int,
    n_combined: int,
) -> torch.Tensor:
    group_size, n_sets = r2o.shape
    n_group = phy2log.shape[0] // (group_size * n_local_routed)
    return workload.new_empty((n_group, group_size, n_sets), dtype=torch.float32)


@torch.library.custom_op(
    "lplb::map_idx",
    mutates_args=(),
    device_types="cpu",
    schema=(
        "(Tensor idx, Tensor probs, Tensor workload_by_sm, Tensor log2phy, Tensor prob_index) "
        "-> Tensor"
    ),
)
def map_idx(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
) -> torch.Tensor:
    """Map logical indices to physical slots (docs/lp.md, "Token mapping").

    Args:
        idx: any shape, int32/int64; probs: [n_group, G, D] float32;
        workload_by_sm: [n_sms, E] int32; log2phy: [E, 2] int32; prob_index: [E] int32.

    Returns:
        Same shape and dtype as idx.
    """
    return reference.map_idx(idx, probs, workload_by_sm, log2phy, prob_index)


@map_idx.register_fake
def _(
    idx: torch.Tensor,
    probs: torch.Tensor,
    workload_by_sm: torch.Tensor,
    log2phy: torch.Tensor,
    prob_index: torch.Tensor,
) -> torch.Tensor:
    return torch.empty_like(idx)
