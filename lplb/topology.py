"""Redundancy topologies: which rank holds the copy of which replicated expert set.

A topology is a `redundant_to_original` ("r2o") matrix of shape [group_size, D], int64: rank
`r`'s `d`-th redundant slot set holds copies of the `d`-th replicated set of rank `r2o[r, d]`.
Every column must be a permutation without fixed points, so each replicated set lives on
exactly two ranks of the group (its original and one copy).
"""

import torch

from eplb.checks import int_tensor, positive_int

__all__ = ["CUBE_8P2E", "HYPERCUBE_16P2E", "RING_8P", "ring", "torus_2d", "validate_r2o"]


def _from_columns(*columns: list[int]) -> torch.Tensor:
    """Stack topology columns (docs/lplb.md lists them column by column) into [group_size, D]."""
    return torch.tensor(columns, dtype=torch.int64).T.contiguous()


# Two copies per rank on 8 ranks: a ring inside each half of the cube, plus the other half.
CUBE_8P2E: torch.Tensor = _from_columns([3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3])
HYPERCUBE_16P2E: torch.Tensor = _from_columns(
    [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14],
    [12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
)


def ring(n: int) -> torch.Tensor:
    """Ring of ``n >= 2`` ranks: rank ``r`` holds copies of rank ``(r + 1) % n``'s replicated set.

    Returns:
        r2o: [n, 1] int64. ``ring(8)`` is ``RING_8P``.
    """
    n = positive_int("n", n, maximum=1 << 16)
    if n < 2:
        raise ValueError(f"ring needs n >= 2 ranks (a ring of 1 is a fixed point), got {n}")
    return ((torch.arange(n) + 1) % n)[:, None].contiguous()


RING_8P: torch.Tensor = ring(8)


def torus_2d(m: int, n: int) -> torch.Tensor:
    """Two-dimensional torus of `m * n` ranks: each rank copies its neighbour along both axes.

    Rank `i * n + j` holds copies of ranks `((i + 1) % m) * n + j` (set 0) and
    `i * n + (j + 1) % n` (set 1).

    Returns:
        r2o: [m * n, 2] int64.
    """
    m, n = positive_int("m", m, maximum=1024), positive_int("n", n, maximum=1024)
    if m < 2 or n < 2:
        raise ValueError(
            f"torus_2d needs integer sides >= 2 (a side of 1 is a fixed point), got {m}x{n}"
        )
    i = torch.arange(m).repeat_interleave(n)
    j = torch.arange(n).repeat(m)
    return torch.stack([((i + 1) % m) * n + j, i * n + (j + 1) % n], dim=1)


def validate_r2o(r2o: torch.Tensor, ep_size: int | None = None) -> None:
    """Check that `r2o` is a valid topology, raising ValueError/TypeError naming the problem.

    Args:
        r2o: [group_size, D] integer tensor; every column a permutation of range(group_size)
            without fixed points.
        ep_size: if given, must be a positive multiple of group_size.
    """
    int_tensor("redundant_to_original", r2o)
    if r2o.device.type == "meta":
        raise ValueError("redundant_to_original must hold values (CPU or CUDA), got a meta tensor")
    if r2o.dim() != 2 or r2o.shape[0] < 2 or r2o.shape[1] < 1:
        raise ValueError(
            "redundant_to_original must be 2-D [group_size >= 2, D >= 1], "
            f"got shape {tuple(r2o.shape)}"
        )
    group_size = r2o.shape[0]
    cols = r2o.detach().to("cpu", torch.int64)
    for d in range(cols.shape[1]):
        col = cols[:, d]
        if not torch.equal(torch.sort(col).values, torch.arange(group_size)):
            raise ValueError(
                f"redundant_to_original column {d} must be a permutation of 0..{group_size - 1}, "
                f"got {col.tolist()}"
            )
        fixed = torch.nonzero(col == torch.arange(group_size)).flatten()
        if fixed.numel() > 0:
            raise ValueError(
                f"redundant_to_original column {d} maps rank {fixed[0].item()} to itself "
                f"(a rank cannot hold a copy of its own experts): {col.tolist()}"
            )
    if ep_size is not None and positive_int("ep_size", ep_size) % group_size != 0:
        raise ValueError(
            f"ep_size must be a positive multiple of the topology's group size {group_size}, "
            f"got {ep_size}"
        )
