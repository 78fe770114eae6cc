"""Argument checks shared by ``eplb`` and ``lplb``: one helper per concept.

Every public entry point of the project validates its arguments with these helpers, so that bad
input always raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
with a message that names the argument and the value, never another exception.
"""

from __future__ import annotations

import operator

import torch

__all__ = [
    "MAX_SLOTS",
    "LayoutError",
    "int_tensor",
    "load_tensor",
    "loads",
    "positive_int",
    "process_group",
    "readable",
    "tensor",
]

INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Bound on slots and experts per layer, far above any real model (DeepSeek-V3 has 256 experts):
# it keeps absurd sizes from allocating gigabytes or running for minutes.
MAX_SLOTS = 1 << 20


class LayoutError(ValueError, AssertionError):
    """A size or layout argument that cannot work (e.g. replicas not a multiple of GPUs).

    Both a ``ValueError`` and an ``AssertionError``: code and tests written against DeepSeek's
    ``eplb.py``, which checks sizes with ``assert``, still catch it.
    """


def positive_int(name: str, value: object, *, maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` in ``[1, maximum]``.

    Bools, floats and other non-integers raise ``TypeError``; values below 1 or above
    ``maximum`` raise ``ValueError``. Anything with ``__index__`` (numpy ints, 0-d int tensors)
    is accepted.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {number}")
    return number


def tensor(name: str, value: object) -> torch.Tensor:
    """``value`` itself if it is a ``torch.Tensor``, else ``TypeError`` naming its type."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def int_tensor(
    name: str,
    value: object,
    *,
    dtypes: tuple[torch.dtype, ...] = INT_DTYPES,
    convert: bool = False,
) -> torch.Tensor:
    """An integer tensor of one of ``dtypes``.

    Args:
        name: argument name used in error messages.
        value: a tensor, or with ``convert=True`` anything ``torch.as_tensor`` takes (lists,
            numpy arrays).
        dtypes: accepted integer dtypes (default: every signed integer dtype and uint8).
        convert: accept array-likes and convert them.

    Returns:
        The tensor (converted if needed), unchanged in device and dtype.
    """
    if not isinstance(value, torch.Tensor):
        if not convert:
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be an integer tensor or array, got {value!r}") from None
    if value.dtype not in dtypes:
        raise TypeError(
            f"{name} must be an integer tensor of dtype {[str(d) for d in dtypes]}, "
            f"got {value.dtype}"
        )
    return value


def readable(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` unless its values cannot be read (a meta tensor has none): ``ValueError``."""
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor: it has no values to read")
    return value


def load_tensor(name: str, value: object) -> torch.Tensor:
    """A tensor of loads: ``value`` as a tensor of an integer or floating dtype (not bool or
    complex); array-likes are converted. Values are not checked here (callers that need finite,
    non-negative loads check those, since it reads the data)."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or array of numbers, got {value!r}") from None
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must have an int or float dtype, got {value.dtype}")
    return value


def loads(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """Load statistics as a non-empty CPU tensor of their own int or float dtype, every entry
    finite and non-negative: :func:`load_tensor` plus the checks that read the values.

    Args:
        name: argument name used in error messages.
        value: a tensor on any device, or anything ``torch.as_tensor`` takes (lists, arrays).
        ndim: the number of dimensions required, if any (other shape rules are the caller's).

    Returns:
        The values on the CPU, detached, dtype unchanged.

    Raises:
        TypeError: not numbers, or a bool or complex dtype.
        ValueError: empty, another number of dimensions than ``ndim``, a meta tensor, NaN,
            infinite or negative entries.
    """
    t = load_tensor(name, value)
    if (ndim is not None and t.dim() != ndim) or t.numel() == 0:
        kind = "non-empty" if ndim is None else f"non-empty {ndim}-D"
        raise ValueError(f"{name} must be a {kind} tensor, got shape {tuple(t.shape)}")
    t = readable(name, t).detach().cpu()
    low, high = torch.aminmax(t)  # one pass; NaN propagates into both
    if not (bool(low >= 0) and bool(high < float("inf"))):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {t[~torch.isfinite(t)][0].item()}")
        raise ValueError(f"{name} must be non-negative, got {low.item()}")
    return t


def process_group(name: str, group: object) -> object:
    """``group`` if it is ``None`` or a ``torch.distributed.ProcessGroup``, else ``TypeError``."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    return group
