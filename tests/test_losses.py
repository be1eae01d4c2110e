"""Losses: LSGAN, cycle/identity L1, content-loss decay and the intensity-group content loss."""

from __future__ import annotations

import math

import pytest
import torch

from exem.losses import (
    IntensityGroupContentLoss,
    content_decay,
    cycle_loss,
    discriminator_loss,
    identity_loss,
    lsgan_loss,
)

T_A = 110 / 255
T_B1, T_B2 = 120 / 255, 160 / 255
MID_EM = 140 / 255


def vol(values: list[float]) -> torch.Tensor:
    """A (1, 1, 1, 1, N) volume."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 1, -1)


# --- adversarial -------------------------------------------------------------------------------------------


def test_lsgan_loss_hand_values() -> None:
    s0 = torch.tensor([[1.0, 0.0]])  # mean((s-1)^2) = 0.5
    s1 = torch.full((1, 1, 2, 2, 2), 3.0)  # mean((3-1)^2) = 4
    assert lsgan_loss([s0, s1], 1.0).item() == pytest.approx(4.5)
    assert lsgan_loss([s0, s1], 0.0).item() == pytest.approx(0.5 + 9.0)


def test_lsgan_loss_bare_tensor_is_one_scale() -> None:
    s = torch.tensor([[0.0], [2.0]])  # a batch of 2: must not be split into two "scales"
    assert lsgan_loss(s, 1.0).item() == pytest.approx(1.0)


def test_lsgan_loss_rejects_empty() -> None:
    with pytest.raises(ValueError):
        lsgan_loss([], 1.0)


def test_discriminator_loss_value() -> None:
    real = [torch.tensor([1.0, 0.0]), torch.tensor([0.5])]  # lsgan(real, 1) = 0.5 + 0.25
    fake = [torch.tensor([0.0, 1.0]), torch.tensor([2.0])]  # lsgan(fake, 0) = 0.5 + 4
    assert discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.75 + 4.5))
    perfect = discriminator_loss([torch.ones(3)], [torch.zeros(3)])
    assert perfect.item() == 0.0


# --- cycle / identity --------------------------------------------------------------------------------------


def test_cycle_and_identity_are_mean_l1() -> None:
    a = vol([0.0, 0.5, 1.0, 0.25])
    b = vol([0.5, 0.5, 0.0, 0.0])
    assert cycle_loss(a, b).item() == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    assert identity_loss(a, b).item() == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    assert cycle_loss(a, a).item() == 0.0


# --- decay -------------------------------------------------------------------------------------------------


def test_content_decay_halves_every_decay_steps() -> None:
    assert content_decay(0, 1000) == 1.0
    assert content_decay(1000, 1000) == pytest.approx(0.5)
    assert content_decay(2000, 1000) == pytest.approx(0.25)
    assert content_decay(500, 1000) == pytest.approx(1 / math.sqrt(2))


def test_content_decay_accepts_tensor_step() -> None:
    out = content_decay(torch.tensor(3000.0), 1000.0)
    assert isinstance(out, torch.Tensor)
    assert out.item() == pytest.approx(0.125)


@pytest.mark.parametrize("decay_steps", [0, -1.0, float("nan"), float("inf")])
def test_content_decay_rejects_bad_decay_steps(decay_steps: float) -> None:
    with pytest.raises(ValueError):
        content_decay(10, decay_steps)


# --- intensity-group content loss ---------------------------------------------------------------------------


def make_perfect_pair(n: int = 64) -> tuple[torch.Tensor, ...]:
    """Volumes far from the thresholds whose translations follow the published group mapping exactly."""
    g = torch.Generator().manual_seed(0)
    a_bright = torch.rand(1, 1, 2, n, n, generator=g) > 0.5
    real_a = a_bright.double()  # 1 = bright LM, 0 = dark LM
    # bright LM -> mid-grey EM; dark LM -> dark or bright EM
    dark_choice = torch.rand(1, 1, 2, n, n, generator=g) > 0.5
    fake_b = torch.where(a_bright, torch.tensor(MID_EM, dtype=torch.float64), dark_choice.double())
    em_class = torch.randint(0, 3, (1, 1, 2, n, n), generator=g)  # 0 mid, 1 dark, 2 bright
    real_b = torch.tensor([MID_EM, 0.0, 1.0], dtype=torch.float64)[em_class]
    # mid EM -> bright LM; dark or bright EM -> dark LM
    fake_a = (em_class == 0).double()
    return real_a, fake_b, real_b, fake_a


def test_content_loss_perfect_mapping_is_near_zero() -> None:
    loss = IntensityGroupContentLoss()
    real_a, fake_b, real_b, fake_a = make_perfect_pair()
    assert loss(real_a, fake_b, real_b, fake_a).item() < 1e-3


def test_content_loss_wrong_mapping_is_clearly_larger() -> None:
    loss = IntensityGroupContentLoss()
    real_a, fake_b, real_b, fake_a = make_perfect_pair()
    good = loss(real_a, fake_b, real_b, fake_a).item()
    inverted = loss(real_a, 1.0 - real_a, real_b, 1.0 - fake_a).item()  # bright LM -> dark EM, etc.
    assert inverted > 0.2
    assert inverted > 100 * good


def test_content_loss_hand_computed_two_voxels() -> None:
    k = 100.0
    a_vals, fb_vals, b_vals, fa_vals = [0.2, 0.7], [0.5, 0.9], [0.3, 0.55], [0.45, 0.1]

    def s(x: float, t: float) -> float:
        return 1.0 / (1.0 + math.exp(-k * (x - t)))

    def mean_abs(xs: list[float]) -> float:
        return sum(abs(v) for v in xs) / len(xs)

    a1 = [s(x, T_A) for x in a_vals]
    a2 = [1 - v for v in a1]
    fb1 = [s(x, T_B1) - s(x, T_B2) for x in fb_vals]
    fb2 = [1 - s(x, T_B1) for x in fb_vals]
    fb3 = [s(x, T_B2) for x in fb_vals]
    b1 = [s(x, T_B1) - s(x, T_B2) for x in b_vals]
    b2 = [1 - s(x, T_B1) for x in b_vals]
    b3 = [s(x, T_B2) for x in b_vals]
    fa1 = [s(x, T_A) for x in fa_vals]
    fa2 = [1 - v for v in fa1]
    expected = (2 / 5) * (
        mean_abs([a1[i] - fb1[i] * a1[i] for i in range(2)])
        + mean_abs([a2[i] - (fb2[i] + fb3[i]) * a2[i] for i in range(2)])
        + mean_abs([b1[i] - fa1[i] * b1[i] for i in range(2)])
        + mean_abs([b2[i] - fa2[i] * b2[i] for i in range(2)])
        + mean_abs([b3[i] - fa2[i] * b3[i] for i in range(2)])
    )
    got = IntensityGroupContentLoss()(vol(a_vals), vol(fb_vals), vol(b_vals), vol(fa_vals)).item()
    assert expected > 0.05  # the example is not trivially zero
    assert got == pytest.approx(expected, rel=1e-9)


def test_content_loss_custom_mapping_and_thresholds() -> None:
    # Two LM thresholds (3 groups: dark, mid, bright) and one EM threshold (2 groups: dark, bright).
    loss = IntensityGroupContentLoss(
        lm_thresholds=(0.3, 0.7),
        em_thresholds=(0.5,),
        slope=50.0,
        lm_to_em=((1,), (0,), (0, 1)),  # LM dark -> EM bright, mid -> EM dark, bright -> either
        em_to_lm=(0, 2),  # EM dark -> LM dark, EM bright -> LM bright
    )
    real_a = vol([0.5, 0.0, 1.0])  # mid, dark, bright LM
    fake_b = vol([0.0, 1.0, 0.6])  # mid -> dark EM, dark -> bright EM, bright -> anything
    real_b = vol([1.0, 0.0])  # bright, dark EM
    fake_a = vol([1.0, 0.0])  # bright EM -> bright LM, dark EM -> dark LM
    assert loss(real_a, fake_b, real_b, fake_a).item() < 1e-3
    assert loss(real_a, 1.0 - fake_b, real_b, 1.0 - fake_a).item() > 0.2


def test_content_loss_gradient_flows_to_fakes() -> None:
    loss = IntensityGroupContentLoss()
    real_a = torch.rand(1, 1, 2, 8, 8)
    real_b = torch.rand(1, 1, 2, 8, 8)
    fake_b = torch.full((1, 1, 2, 8, 8), 0.45, requires_grad=True)
    fake_a = torch.full((1, 1, 2, 8, 8), 0.45, requires_grad=True)
    value = loss(real_a, fake_b, real_b, fake_a)
    assert value.dim() == 0
    value.backward()
    assert fake_b.grad is not None and fake_b.grad.abs().sum() > 0
    assert fake_a.grad is not None and fake_a.grad.abs().sum() > 0


def test_content_loss_accepts_different_domain_shapes() -> None:
    loss = IntensityGroupContentLoss()
    a = torch.rand(2, 1, 3, 16, 16)
    b = torch.rand(2, 1, 5, 32, 32)
    assert torch.isfinite(loss(a, a, b, b))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lm_thresholds": ()},
        {"lm_thresholds": (0.1, 0.2, 0.3, 0.4, 0.5)},  # 6 groups: more than MAX_GROUPS
        {"em_thresholds": (0.6, 0.4)},
        {"em_thresholds": (0.5, 0.5)},
        {"lm_thresholds": (1.5,)},
        {"em_thresholds": (-0.1, 0.5)},
        {"slope": 0.0},
        {"slope": -1.0},
        {"lm_to_em": ((0,),)},
        {"lm_to_em": ((0,), ())},
        {"lm_to_em": ((0,), (1, 3))},
        {"em_to_lm": (0, 1)},
        {"em_to_lm": (0, 1, 2)},
        {"em_to_lm": (0, -1, 1)},
    ],
)
def test_content_loss_rejects_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError) as err:
        IntensityGroupContentLoss(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_content_loss_accepts_lists_from_config() -> None:
    loss = IntensityGroupContentLoss(
        lm_thresholds=[0.4], em_thresholds=[0.45, 0.6], slope=80, lm_to_em=[[0, 2], [1]], em_to_lm=[0, 1, 0]
    )
    assert loss.lm_to_em == ((0, 2), (1,))
    assert loss.em_to_lm == (0, 1, 0)
    assert "slope=80.0" in repr(loss)


def test_model_config_and_code_defaults_are_the_published_values() -> None:
    """conf/model/exem.yaml's model.loss and the losses' own defaults agree, and both are the published ExEM
    settings (the networks and the optimizer: tests/test_model_config.py)."""
    from omegaconf import OmegaConf

    from exem.cli import CONF_DIR
    from exem.losses import LossWeights
    from exem.module import ExEMModule

    published = {"lambda_gan": 1.0, "lambda_cycle": 10.0, "lambda_identity": 0.0, "lambda_content": 50.0,
                 "content_decay_steps": 1000.0}  # fmt: skip
    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/exem.yaml"), resolve=False)
    assert {k: float(cfg["loss"][k]) for k in published} == published
    code = LossWeights()
    assert {k: getattr(code, k) for k in published} == published
    content = IntensityGroupContentLoss()
    for key in ("lm_thresholds", "em_thresholds", "slope"):
        assert getattr(content, key) == pytest.approx(cfg["loss"]["content"][key]), key
    assert [list(g) for g in content.lm_to_em] == cfg["loss"]["content"]["lm_to_em"] == [[0, 2], [1]]
    assert list(content.em_to_lm) == cfg["loss"]["content"]["em_to_lm"] == [0, 1, 0]
    # a module built with an empty loss mapping gets the published values too
    module = ExEMModule(
        generator={"widths": [4, 8]}, discriminator={"num_scales": 1, "base_filters": 4}, loss={}
    )
    assert module.loss_weights == code


@pytest.mark.parametrize("bad", [{"lambda_cycle": -1.0}, {"content_decay_steps": 0}, {"lambda_gan": "1"}])
def test_loss_weights_refuse_bad_values(bad: dict) -> None:
    from exem.losses import LossWeights

    with pytest.raises(ValueError):
        LossWeights(**bad)


def test_unknown_loss_key_is_one_line() -> None:
    from exem.module import ExEMModule

    with pytest.raises(ValueError, match="model.loss: unknown key"):
        ExEMModule(generator={"widths": [4, 8]}, discriminator={"num_scales": 1}, loss={"lambda_cycel": 5.0})
