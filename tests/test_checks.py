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


def test_check_yx_divisible() -> None:
    from exem.checks import check_yx_divisible

    check_yx_divisible((4, 32, 64), 16)
    check_yx_divisible((2, 1, 4, 32, 64), 16)  # a batch shape: the last two entries count
    for bad in ((4, 30, 32), (4, 32, 0)):
        with pytest.raises(
            ValueError, match=r"patch Y×X = \d+×\d+ is not divisible by 16 \(why\); use a multiple of 16"
        ):
            check_yx_divisible(bad, 16, " (why)")


def test_check_input_shape_uses_the_networks_own_rule_or_its_divisor() -> None:
    from exem.checks import check_input_shape
    from exem.models import AnisotropicUNet3D

    with pytest.raises(ValueError, match=r"2\^\(levels-1\) for widths \(4, 8, 16\)"):
        check_input_shape(AnisotropicUNet3D(widths=(4, 8, 16)), (4, 30, 32))

    class Plain:
        divisor = 8

    check_input_shape(Plain(), (1, 16, 24))
    with pytest.raises(ValueError, match="not divisible by 8; use a multiple of 8"):
        check_input_shape(Plain(), (1, 16, 20))
    check_input_shape(object(), (1, 7, 5))  # no divisor: anything goes
