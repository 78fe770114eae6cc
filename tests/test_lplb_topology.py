"""Topology constants (docs/lplb.md, "Topologies") and validation of r2o matrices."""

import pytest
import torch

from lplb import CUBE_8P2E, HYPERCUBE_16P2E, RING_8P, ring, torus_2d, validate_r2o


def test_constants_match_design_columns() -> None:
    assert CUBE_8P2E[:, 0].tolist() == [3, 0, 1, 2, 7, 4, 5, 6]
    assert CUBE_8P2E[:, 1].tolist() == [6, 7, 4, 5, 0, 1, 2, 3]
    assert HYPERCUBE_16P2E[:, 0].tolist() == [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14]
    assert HYPERCUBE_16P2E[:, 1].tolist() == [12, 13, 14, 15, *range(12)]
    assert RING_8P.tolist() == [[1], [2], [3], [4], [5], [6], [7], [0]]
    for r2o in (CUBE_8P2E, HYPERCUBE_16P2E, RING_8P):
        assert r2o.dtype == torch.int64
        validate_r2o(r2o)


@pytest.mark.parametrize(("m", "n"), [(8, 4), (2, 2), (3, 5)])
def test_torus_rows(m: int, n: int) -> None:
    r2o = torus_2d(m, n)
    assert r2o.dtype == torch.int64
    assert r2o.shape == (m * n, 2)
    for i in range(m):
        for j in range(n):
            assert r2o[i * n + j].tolist() == [((i + 1) % m) * n + j, i * n + (j + 1) % n]
    validate_r2o(r2o, ep_size=2 * m * n)


@pytest.mark.parametrize(("m", "n"), [(1, 4), (4, 1)])
def test_degenerate_torus_raises(m: object, n: object) -> None:
    with pytest.raises(ValueError, match="torus_2d"):
        torus_2d(m, n)


def test_torus_sides_must_be_ints() -> None:
    with pytest.raises(TypeError, match="m must be an int"):
        torus_2d(2.0, 2)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_is_a_valid_topology(n: int) -> None:
    r2o = ring(n)
    assert r2o.tolist() == [[(r + 1) % n] for r in range(n)]
    validate_r2o(r2o, ep_size=n)


def test_ring_8_is_ring_8p_and_bad_sizes_raise() -> None:
    assert torch.equal(ring(8), RING_8P)
    with pytest.raises(ValueError, match="n >= 2"):
        ring(1)
    with pytest.raises(TypeError, match="n must be an int"):
        ring(2.5)


@pytest.mark.parametrize(
    ("r2o", "error", "message"),
    [
        (torch.tensor([1, 0]), ValueError, "2-D"),
        (torch.zeros(1, 2, dtype=torch.int64), ValueError, "2-D"),
        (torch.zeros(4, 0, dtype=torch.int64), ValueError, "2-D"),
        (torch.tensor([[1.0], [0.0]]), TypeError, "integer"),
        ([[1], [0]], TypeError, "torch.Tensor"),
        (torch.tensor([[1], [1], [0]]), ValueError, "permutation"),
        (torch.tensor([[1], [2], [3]]), ValueError, "permutation"),
        (torch.tensor([[1, 0], [0, 1]]), ValueError, "column 1 maps rank 0 to itself"),
        (torch.tensor([[1], [0], [2]]), ValueError, "rank 2 to itself"),
    ],
)
def test_invalid_r2o_raises(r2o: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        validate_r2o(r2o)


@pytest.mark.parametrize("ep_size", [4, 12, 0, -8])
def test_ep_size_must_be_multiple_of_group(ep_size: int) -> None:
    with pytest.raises(ValueError, match=f"got {ep_size}"):
        validate_r2o(CUBE_8P2E, ep_size)
