"""Small argument checks and formatting shared by the whole package: one implementation of each."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["fmt_voxels", "positive_int", "triple"]


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
