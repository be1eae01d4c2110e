"""Generator and discriminator: published layout, parameter counts, shapes and input validation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from exem.models import AnisotropicUNet3D, MultiScaleDiscriminator3D, group_count

KEYS_FILE = Path(__file__).parent / "data" / "published_generator_keys.txt"
TINY = (4, 8, 16, 32, 64)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def published_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


# --- group_count -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "groups"),
    [(1, 1), (2, 1), (4, 1), (8, 1), (16, 4), (32, 8), (64, 8), (128, 16), (256, 32), (512, 32)],
)
def test_group_count_published_lookup(width: int, groups: int) -> None:
    assert group_count(width) == groups


def test_group_count_divides_every_width() -> None:
    for width in range(1, 1025):
        g = group_count(width)
        assert 1 <= g <= 32 and width % g == 0, width


@pytest.mark.parametrize(("width", "groups"), [(3, 1), (24, 3), (40, 5), (96, 12), (1024, 32), (48, 6)])
def test_group_count_rule_for_other_widths(width: int, groups: int) -> None:
    assert group_count(width) == groups


@pytest.mark.parametrize("width", [0, -4])
def test_group_count_rejects_non_positive(width: int) -> None:
    with pytest.raises(ValueError):
        group_count(width)


# --- generator ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "expected"),
    [
        ((32, 64, 128, 256, 512), 27_517_441),
        ((8, 16, 32, 64, 128), 1_721_665),
        ((16, 32, 64, 128, 256), 6_881_793),
    ],
)
def test_generator_parameter_counts(widths: tuple[int, ...], expected: int) -> None:
    assert n_params(AnisotropicUNet3D(widths=widths)) == expected


def test_generator_defaults() -> None:
    g = AnisotropicUNet3D()
    assert g.widths == (32, 64, 128, 256, 512)
    assert g.divisor == 16
    assert list(g.buffers()) == []


def test_generator_state_dict_matches_published_keys() -> None:
    expected = published_keys()
    assert len(expected) == 87
    got = [(k, tuple(v.shape)) for k, v in AnisotropicUNet3D().state_dict().items()]
    assert got == expected  # same keys, same shapes, same order


def test_generator_loads_published_state_dict_strictly() -> None:
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in published_keys()}
    net = AnisotropicUNet3D()
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = net.state_dict()
    assert list(own) == list(state)  # same keys, in the published order
    assert all(torch.equal(own[k], v) for k, v in state.items())  # every tensor landed where it belongs


def test_generator_names_are_generic_over_levels() -> None:
    g = AnisotropicUNet3D(widths=(4, 8, 16))
    names = {k.split(".")[0] for k in g.state_dict()}
    assert names == {
        "first_conv",
        "tripleconv1",
        "tripleconv2",
        "tripleconv3",
        "tripleconv_up1",
        "tripleconv_up2",
        "final_conv",
        "one_by_one_conv",
    }
    assert g.tripleconv_up1.conv1.in_channels == 16 + 8
    assert g.tripleconv_up2.conv1.out_channels == 4
    assert g.divisor == 4


@pytest.mark.parametrize("shape", [(1, 1, 16, 256, 256), (1, 1, 1, 512, 512)])
def test_generator_output_shape(shape: tuple[int, ...]) -> None:
    g = AnisotropicUNet3D(widths=TINY)
    with torch.no_grad():
        y = g(torch.rand(shape))
    assert y.shape == shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("widths", [(6, 12, 24), (5, 10, 20, 40)])
def test_generator_odd_widths(widths: tuple[int, ...]) -> None:
    g = AnisotropicUNet3D(in_channels=2, out_channels=3, widths=widths)
    x = torch.rand(2, 2, 3, 32, 16)
    y = g(x)
    assert y.shape == (2, 3, 3, 32, 16)
    y.mean().backward()
    assert g.first_conv.weight.grad is not None


def test_generator_is_differentiable_and_linear_output() -> None:
    g = AnisotropicUNet3D(widths=(4, 8))
    x = torch.rand(1, 1, 2, 8, 8, requires_grad=True)
    g(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        g.one_by_one_conv.bias.fill_(-5.0)  # no final activation: negative outputs pass through
        assert (g(torch.rand(1, 1, 1, 8, 8)) < 0).any()


@pytest.mark.parametrize("yx", [(100, 128), (128, 40), (8, 16)])
def test_generator_rejects_indivisible_xy(yx: tuple[int, int]) -> None:
    g = AnisotropicUNet3D(widths=TINY)
    with pytest.raises(ValueError, match="not divisible by 16"):
        g(torch.rand(1, 1, 2, *yx))


def test_generator_error_message_is_helpful() -> None:
    g = AnisotropicUNet3D(widths=TINY)
    with pytest.raises(ValueError) as err:
        g.check_input_shape((16, 100, 128))
    msg = str(err.value)
    assert "100×128" in msg and "multiple of 16" in msg and "\n" not in msg


def test_generator_rejects_wrong_input_rank_or_channels() -> None:
    g = AnisotropicUNet3D(widths=(4, 8))
    with pytest.raises(ValueError, match="B, C, Z, Y, X"):
        g(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        g(torch.rand(1, 2, 1, 8, 8))


@pytest.mark.parametrize("widths", [(), (32,), (32, 0), (32, -8), (32.0, 64), "3264", (True, 4), None])
def test_generator_rejects_bad_widths(widths: object) -> None:
    with pytest.raises(ValueError):
        AnisotropicUNet3D(widths=widths)  # type: ignore[arg-type]


# --- discriminator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_scales", "expected"), [(2, 16_532_354), (3, 24_798_531)])
def test_discriminator_parameter_counts(num_scales: int, expected: int) -> None:
    assert n_params(MultiScaleDiscriminator3D(num_scales=num_scales)) == expected


def test_discriminator_has_no_buffers() -> None:
    assert list(MultiScaleDiscriminator3D(base_filters=4).buffers()) == []


@pytest.mark.parametrize(
    ("shape", "num_scales", "expected"),
    [
        ((2, 1, 4, 64, 32), 2, [(2, 1, 4, 4, 2), (2, 1, 4, 2, 1)]),
        ((1, 1, 16, 256, 256), 2, [(1, 1, 16, 16, 16), (1, 1, 16, 8, 8)]),
        ((1, 1, 1, 64, 64), 2, [(1, 1, 1, 4, 4), (1, 1, 1, 2, 2)]),
        ((1, 1, 3, 128, 128), 3, [(1, 1, 3, 8, 8), (1, 1, 3, 4, 4), (1, 1, 3, 2, 2)]),
    ],
)
def test_discriminator_output_shapes(
    shape: tuple[int, ...], num_scales: int, expected: list[tuple[int, ...]]
) -> None:
    d = MultiScaleDiscriminator3D(num_scales=num_scales, base_filters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no InstanceNorm warnings either
        out = d(torch.rand(shape))
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == expected


def test_discriminator_backward_in_train_mode() -> None:
    d = MultiScaleDiscriminator3D(base_filters=4).train()
    x = torch.rand(1, 1, 1, 64, 64, requires_grad=True)
    sum(o.mean() for o in d(x)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 32, 32), (1, 1, 4, 16, 16), (1, 1, 1, 64, 8)])
def test_discriminator_rejects_too_small_inputs(shape: tuple[int, ...]) -> None:
    d = MultiScaleDiscriminator3D(num_scales=2, base_filters=4)
    with pytest.raises(ValueError, match="too small"):
        d(torch.rand(shape))


def test_discriminator_min_yx_is_sufficient() -> None:
    for num_scales in (1, 2, 3):
        d = MultiScaleDiscriminator3D(num_scales=num_scales, base_filters=2)
        for z in (1, 2):
            m = d.min_yx(z)
            assert len(d(torch.rand(1, 1, z, m, m))) == num_scales


@pytest.mark.parametrize("kwargs", [{"num_scales": 0}, {"base_filters": 0}, {"in_channels": -1}])
def test_discriminator_rejects_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MultiScaleDiscriminator3D(**kwargs)
