"""exem.checks: the one implementation of the small argument checks and formats."""

from __future__ import annotations

import numpy as np
import pytest

from exem.checks import fmt_voxels, positive_int, triple


def test_fmt_voxels() -> None:
    assert fmt_voxels((16, 256, 256)) == "16×256×256"
    assert fmt_voxels(np.array([1.0, 2.0])) == "1×2"


def test_triple() -> None:
    assert triple(4, "overlap") == (4, 4, 4)
    assert triple(np.int64(2), "overlap") == (2, 2, 2)
    assert triple([1, 2, 3], "patch") == (1, 2, 3)
    with pytest.raises(ValueError, match=r"patch must have 3 values \(z, y, x\), got \[1, 2\]"):
        triple([1, 2], "patch")


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "4"])
def test_positive_int_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="num_scales must be a positive int"):
        positive_int("num_scales", bad)  # type: ignore[arg-type]


def test_positive_int_accepts_index_types() -> None:
    assert positive_int("n", 3) == 3 and positive_int("n", np.int32(7)) == 7
