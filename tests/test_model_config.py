"""conf/model/exem.yaml mirrors the constructors, and both it and the classes' own defaults are the published model.

The published networks (~88 M parameters for the four) are built on the meta device: shapes and parameter
counts without memory or initialisation time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from exem.config import compose_config
from exem.losses import LossWeights
from exem.models import AnisotropicUNet3D, MultiScaleDiscriminator3D
from exem.module import ExEMModule

PUBLISHED_GENERATOR_PARAMS = 27_517_441  # widths (32, 64, 128, 256, 512)
PUBLISHED_DISCRIMINATOR_PARAMS = 16_532_354  # 2 scales, 64 base filters
PUBLISHED_LOSS = LossWeights(
    lambda_gan=1.0, lambda_cycle=10.0, lambda_identity=0.0, lambda_content=50.0, content_decay_steps=1000
)
TINY = {"generator": {"widths": [4, 8]}, "discriminator": {"num_scales": 1, "base_filters": 4}}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def assert_published(module: ExEMModule) -> None:
    for g in (module.G_AB, module.G_BA):
        assert isinstance(g, AnisotropicUNet3D) and g.widths == (32, 64, 128, 256, 512)
        assert (g.in_channels, g.out_channels, g.activation_checkpointing) == (1, 1, False)
        assert n_params(g) == PUBLISHED_GENERATOR_PARAMS
    for d in (module.D_A, module.D_B):
        assert isinstance(d, MultiScaleDiscriminator3D) and (d.num_scales, d.base_filters) == (2, 64)
        assert n_params(d) == PUBLISHED_DISCRIMINATOR_PARAMS
    assert module.loss_weights == PUBLISHED_LOSS
    optimizers, schedulers = module.configure_optimizers()
    assert [type(o) for o in optimizers] == [torch.optim.Adam] * 3
    for opt in optimizers:
        assert opt.defaults["lr"] == 3e-4 and tuple(opt.defaults["betas"]) == (0.5, 0.999)
        assert opt.defaults["weight_decay"] == 0.0
    assert schedulers == [] and module.grad_clip is None  # scheduler and clipping off
    assert module.pool_A.size == module.pool_B.size == 0


def test_yaml_and_code_defaults_are_the_published_model(tmp_path: Path) -> None:
    cfg = compose_config([], output_dir=tmp_path)
    with torch.device("meta"):
        from_code = ExEMModule()
        from_yaml = instantiate(cfg.model, _convert_="all")  # as exem.train.train does
    assert_published(from_code)
    assert_published(from_yaml)
    # the hyper-parameters hold the nodes as used; the YAML states the same networks and optimizer as the code
    for key in ("generator", "discriminator"):
        assert from_yaml.hparams[key]["_target_"] == from_code.hparams[key]["_target_"]
    assert from_yaml.hparams["optimizer"] == {
        **from_code.hparams["optimizer"],
        "foreach": None,
        "fused": None,
    }


def test_yaml_nodes_are_hydra_nodes(tmp_path: Path) -> None:
    """Each node mirrors its constructor: Hydra alone builds the same classes with the same arguments."""
    model = compose_config(
        ["model.generator.widths=[4,8]", "model.discriminator.base_filters=4"], output_dir=tmp_path
    ).model
    g = instantiate(model.generator)
    assert isinstance(g, AnisotropicUNet3D) and g.widths == (4, 8)
    assert isinstance(instantiate(model.discriminator), MultiScaleDiscriminator3D)
    adam = instantiate(model.optimizer)(g.parameters())  # a partial
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 3e-4
    assert model.scheduler is None and model.grad_clip is None


def test_nodes_with_and_without_a_target() -> None:
    # without _target_: arguments of the default class, the published optimizer with some values changed
    module = ExEMModule(**TINY, optimizer={"lr": 1e-3})
    assert module.G_AB.widths == (4, 8) and module.G_AB is not module.G_BA
    assert module.hparams["generator"] == {"_target_": "exem.models.unet.AnisotropicUNet3D", "widths": [4, 8]}
    opt = module.configure_optimizers()[0][0]
    assert (
        isinstance(opt, torch.optim.Adam)
        and opt.defaults["lr"] == 1e-3
        and opt.defaults["betas"] == (0.5, 0.999)
    )
    # with _target_: taken as given (AdamW's own betas), and a scheduler partial for each optimizer
    module = ExEMModule(
        **TINY,
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        scheduler={
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
            "T_0": 4,
            "eta_min": 1e-5,
        },
    )
    optimizers, schedulers = module.configure_optimizers()
    assert [type(o) for o in optimizers] == [torch.optim.AdamW] * 3 and optimizers[0].defaults["betas"] == (
        0.9,
        0.999,
    )
    assert [s["name"] for s in schedulers] == ["lr-G", "lr-D_A", "lr-D_B"]
    assert all(s["interval"] == "step" and s["scheduler"].eta_min == 1e-5 for s in schedulers)
    # rebuilt from its hyper-parameters (load_from_checkpoint): the same model
    rebuilt = ExEMModule(**module.hparams)
    assert rebuilt.hparams == module.hparams
    assert type(rebuilt.configure_optimizers()[0][0]) is torch.optim.AdamW


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"optimizer": {"_target_": "torch.optim.Adamm"}},
            "model.optimizer._target_: cannot import 'torch.optim.Adamm'",
        ),
        ({"scheduler": {"T_0": 4}}, "model.scheduler needs a _target_"),
        (
            {"generator": {"_target_": "exem.models.unet.NoSuchNet"}},
            "model.generator._target_: cannot import",
        ),
    ],
)
def test_bad_target_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ExEMModule(**{**TINY, **kwargs})
    assert "\n" not in str(info.value)


def test_checkpoint_from_before_the_nodes_still_loads(tmp_path: Path) -> None:
    """Old hyper-parameters: networks without _target_, ``optim: {name, lr, ...}``, ``scheduler: {name, ...}``."""
    import lightning as L

    from exem.checkpoints import check_resume_checkpoint, load_generator

    module = ExEMModule(**TINY, optimizer={"lr": 1e-3})
    legacy = {
        "generator": {"in_channels": 1, "out_channels": 1, "widths": [4, 8]},
        "discriminator": {"in_channels": 1, "num_scales": 1, "base_filters": 4},
        "loss": {"lambda_content": 50.0},
        "optim": {"name": "adam", "lr": 1e-3, "betas": [0.5, 0.999], "grad_clip": None, "fused": None},
        "scheduler": {"name": "cosine_warm_restarts", "T_0": 4, "T_mult": 1, "eta_min_fraction": 0.1},
        "replay_buffer_size": 0,
    }
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "epoch": 0,
            "global_step": 3,
            "pytorch-lightning_version": L.__version__,
            "state_dict": module.state_dict(),
            "loops": {},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": legacy,
        },
        path,
    )
    assert load_generator(path).widths == (4, 8)  # inference
    check_resume_checkpoint(path, ExEMModule(**TINY))  # resume with today's config
    loaded = ExEMModule.load_from_checkpoint(path, map_location="cpu")  # the unknown `optim` is left out
    assert loaded.G_AB.widths == (4, 8)
    schedulers = loaded.configure_optimizers()[1]
    assert isinstance(schedulers[0]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
    assert schedulers[0]["scheduler"].eta_min == pytest.approx(0.1 * 3e-4)  # fraction of the optimizer's lr


def test_gpu_trainers_autotune_convolutions(tmp_path: Path) -> None:
    """cuDNN's autotuning (Lightning's ``benchmark``) is on for every trainer meant for GPUs, DDP included: 3D
    convolutions of one patch shape run its fastest algorithm."""
    for name in ("gpu", "ddp"):
        cfg = compose_config([f"trainer={name}"], output_dir=tmp_path)
        assert cfg.trainer.benchmark is True, name
