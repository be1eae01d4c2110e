"""Small argument checks and formatting shared by the whole package: one implementation of each."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_batch",
    "check_input_shape",
    "check_yx_divisible",
    "fmt_voxels",
    "one_of",
    "positive_ints",
    "positive_int",
    "triple",
]


def fmt_voxels(values: Sequence[int]) -> str:
    """``(16, 256, 256)`` → ``"16×256×256"`` (a shape, patch or block in voxels)."""
    return "×".join(str(int(v)) for v in values)


def triple(value: Sequence[int] | int, name: str) -> tuple[int, int, int]:
    """``(z, y, x)`` ints from 3 values, or one int for all three axes.

    Raises:
        ValueError: not 3 values (one line, naming ``name``).
    """
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 3
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (z, y, x), got {list(value)}")
    return out  # type: ignore[return-value]


def positive_int(name: str, value: int) -> int:
    """``value`` as an int ≥ 1 (bools and non-integers refused).

    Raises:
        ValueError: ``"<name> must be a positive int, got …"``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def one_of(value: str, choices: Sequence[str], name: str) -> str:
    """``value`` when it is one of ``choices``.

    Raises:
        ValueError: ``"<name> must be one of a, b, c, got 'x'"``.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def positive_ints(value: Sequence[int], length: int, name: str, axes: str) -> tuple[int, ...]:
    """``length`` ints ≥ 1 from ``value`` (e.g. a patch (z, y, x) or an example shape (B, C, Z, Y, X)).

    Raises:
        ValueError: ``"<name> must be <length> positive ints (<axes>), got …"``.
    """
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != length or min(out) < 1:
        raise ValueError(f"{name} must be {length} positive ints ({axes}), got {value!r}")
    return out


def check_batch(x: object, in_channels: int, who: str) -> None:
    """Raise a one-line ValueError unless ``x`` is a ``(B, in_channels, Z, Y, X)`` tensor (``who``: the network)."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 5:
        raise ValueError(f"{who} expects a (B, C, Z, Y, X) tensor, got shape {shape}")
    if shape[1] != in_channels:
        raise ValueError(f"{who} expects {in_channels} input channel(s), got {shape[1]}")


def check_yx_divisible(shape: Sequence[int], divisor: int, why: str = "") -> None:
    """Raise a one-line ValueError unless the last two entries (Y, X) of ``shape`` are positive multiples of
    ``divisor`` (a U-Net pools Y and X ``levels − 1`` times). ``why`` is added after the divisor, e.g.
    ``" (2^(levels-1) for widths (32, 64))"``.

    ``shape`` may be a patch ``(Z, Y, X)`` or a batch shape ``(B, C, Z, Y, X)``.
    """
    y, x, d = int(shape[-2]), int(shape[-1]), int(divisor)
    if y < 1 or x < 1 or y % d or x % d:
        raise ValueError(f"patch Y×X = {y}×{x} is not divisible by {d}{why}; use a multiple of {d}")


def check_input_shape(net: object, shape: Sequence[int]) -> None:
    """Whether ``net`` takes ``shape``: its own ``check_input_shape`` when it has one (exem's networks), else
    :func:`check_yx_divisible` with its ``divisor`` attribute (1 when it has none)."""
    check = getattr(net, "check_input_shape", None)
    if callable(check):
        check(shape)
        return
    check_yx_divisible(shape, int(getattr(net, "divisor", 1)))
