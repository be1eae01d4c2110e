"""ExEMModule: the ExM→EM CycleGAN as a LightningModule with manual optimization.

Domains: A = light microscopy (ExM), B = electron microscopy. Generators G_AB (ExM→EM) and G_BA (EM→ExM) are
:class:`~exem.models.AnisotropicUNet3D`; discriminators D_A and D_B are
:class:`~exem.models.MultiScaleDiscriminator3D`. All tensors are ``(B, 1, Z, Y, X)`` float with intensities
normalised to [0, 1].

Each training batch does, in order: one generator step (both generators, one optimizer), one D_A step, one D_B
step. Lightning's ``trainer.global_step`` therefore advances by 3 per batch; the content-loss decay is driven by
:attr:`ExEMModule.batch_step`, a batch counter kept in the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from exem.analysis.metrics import image_quality
from exem.callbacks import rng_state, set_rng_state
from exem.content_groups import (
    RECORD_KEYS,
    CalibrationError,
    ContentFitSettings,
    ContentGroups,
    fit_from_datamodule,
    write_content_groups,
)
from exem.losses import (
    IntensityGroupContentLoss,
    content_decay,
    cycle_loss,
    discriminator_loss,
    identity_loss,
    lsgan_loss,
)
from exem.models import AnisotropicUNet3D, MultiScaleDiscriminator3D
from exem.panels import save_panel, translation_panel

log = logging.getLogger(__name__)

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Devices with fused Adam/AdamW kernels, used when optim.fused and optim.foreach are both null (auto).
_FUSED_DEVICES = ("cpu", "cuda")
# Values of the performance switches torch_compile and channels_last: on, off, or on for a CUDA device only.
_AUTO = "auto"


def _switch(name: str, value: bool | str) -> bool | str:
    """A performance switch: True, False or ``"auto"`` (on when training on a CUDA GPU)."""
    if isinstance(value, bool) or value == _AUTO:
        return value
    raise ValueError(f"model.{name} must be true, false or {_AUTO!r}, got {value!r}")


def _resolve(value: bool | str, device: torch.device) -> bool:
    return device.type == "cuda" if value == _AUTO else bool(value)


@contextlib.contextmanager
def _frozen(*nets: nn.Module) -> Iterator[None]:
    """Parameters of ``nets`` need no gradients inside the block (no weight-gradient work); restored after."""
    params = [p for net in nets for p in net.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def _plain(value: Any) -> Any:
    """OmegaConf containers → plain dicts/lists (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator loss terms (``model.loss`` without its ``content`` settings), published defaults.

    ``G = lambda_gan·(adv_AB + adv_BA) + lambda_cycle·cycle + lambda_content·2^(−batch/content_decay_steps)·content
    (+ lambda_identity·identity)``.
    """

    lambda_gan: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0
    lambda_content: float = 50.0
    content_decay_steps: float = 1000.0

    def __post_init__(self) -> None:
        for name in (
            "lambda_gan",
            "lambda_cycle",
            "lambda_identity",
            "lambda_content",
            "content_decay_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"model.loss.{name} must be a number ≥ 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.content_decay_steps > 0:
            raise ValueError("loss.content_decay_steps must be > 0")


class ReplayBuffer(nn.Module):
    """A pool of past generated patches shown to a discriminator (CycleGAN's image pool).

    With probability ½ a new fake replaces a random stored one and the stored one is returned instead. Size 0
    disables the pool (fakes pass through). The pool is a buffer, so it is saved in checkpoints.
    """

    def __init__(self, size: int = 0) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"replay buffer size must be >= 0, got {size}")
        self.size = int(size)
        self.register_buffer("images", torch.empty(0), persistent=True)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=True)
        # Host copy of ``count``: reading the buffer on a GPU would wait for the device at every sample.
        self._filled: int | None = 0

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "images"
        if key in state_dict:  # the stored pool may have a different shape than the empty placeholder
            self.images = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled = None  # re-read from the loaded buffer at the next call

    @torch.no_grad()
    def forward(self, fakes: Tensor) -> Tensor:
        """Return a batch of the same shape as ``fakes`` (``(B, 1, Z, Y, X)``), partly drawn from the pool."""
        if self.size == 0:
            return fakes
        fakes = fakes.detach()
        if self.images.numel() == 0 or self.images.shape[1:] != fakes.shape[1:]:
            self.images = fakes.new_zeros((self.size, *fakes.shape[1:]))
            self.count.zero_()
            self._filled = 0
        if self._filled is None:
            self._filled = int(self.count)  # once after loading a checkpoint
        out = []
        for f in fakes:
            n = self._filled
            if n < self.size:
                self.images[n] = f
                self.count += 1
                self._filled = n + 1
                out.append(f)
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(self.size, ()))
                out.append(self.images[j].clone())
                self.images[j] = f
            else:
                out.append(f)
        return torch.stack(out)


class ExEMModule(L.LightningModule):
    """The ExEM 3D CycleGAN.

    Args:
        generator: keyword arguments of :class:`AnisotropicUNet3D` (both generators share them).
        discriminator: keyword arguments of :class:`MultiScaleDiscriminator3D`.
        loss: :class:`LossWeights` fields ``lambda_gan``, ``lambda_cycle``, ``lambda_identity``,
            ``lambda_content``, the decay ``content_decay_steps`` (batches; missing ones take the published values)
            and ``content``: keyword arguments of
            :class:`IntensityGroupContentLoss` and of :class:`~exem.content_groups.ContentFitSettings` (``auto``:
            fit the groups from the training data before the first step, see :meth:`fit_content_groups`). A fit
            stored there (a checkpoint's hyper-parameters) is used as it is and never refitted.
        optim: ``name`` (adam | adamw), ``lr``, ``betas``, ``weight_decay``, ``grad_clip`` (max gradient norm or
            None), ``foreach``/``fused`` (optional, passed to the optimizer).
        scheduler: None, or ``{"name": "cosine_warm_restarts", "T_0", "T_mult", "eta_min_fraction"}``, stepped
            once per batch.
        replay_buffer_size: size of each discriminator's replay pool (0 = off).
        torch_compile: ``torch.compile`` each of the four networks (True, False or ``"auto"`` = on a CUDA GPU).
            Same maths; the first steps pay the compilation.
        channels_last: keep weights and batches in ``torch.channels_last_3d`` memory format (True, False or
            ``"auto"`` = on a CUDA GPU). Same maths.
        image_every_n_steps: write an image panel every N batches (0 = never).
        image_dir: folder for the PNG panels (None = only the logger gets them).
        report_dir: the run folder, where ``content_groups.json`` / ``.png`` go when the groups are fitted
            (None = not written).
    """

    def __init__(
        self,
        generator: Mapping[str, Any],
        discriminator: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        replay_buffer_size: int = 0,
        image_every_n_steps: int = 0,
        image_dir: str | None = None,
        torch_compile: bool | str = False,
        channels_last: bool | str = False,
        report_dir: str | None = None,
    ) -> None:
        super().__init__()
        # Plain containers only, so checkpoints load with torch.load(weights_only=True) (save_hyperparameters
        # reads these locals).
        generator, discriminator, loss, optim, scheduler = (
            _plain(v) for v in (generator, discriminator, loss, optim, scheduler)
        )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.G_AB = AnisotropicUNet3D(**generator)
        self.G_BA = AnisotropicUNet3D(**generator)
        self.D_A = MultiScaleDiscriminator3D(**discriminator)
        self.D_B = MultiScaleDiscriminator3D(**discriminator)
        self.content_settings, content_kwargs = ContentFitSettings.split(loss.get("content"))
        # A fit stored in the hyper-parameters (loaded from a checkpoint) is reused as it is.
        self.content_groups: ContentGroups | None = ContentGroups.from_config(content_kwargs)
        for key in RECORD_KEYS:
            content_kwargs.pop(key, None)
        self.content_loss = IntensityGroupContentLoss(**content_kwargs)
        self.report_dir = Path(report_dir) if report_dir else None
        self.pool_A = ReplayBuffer(replay_buffer_size)
        self.pool_B = ReplayBuffer(replay_buffer_size)
        weights = {k: v for k, v in dict(loss).items() if k != "content"}
        unknown = sorted(set(weights) - set(LossWeights.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model.loss: unknown key(s) {', '.join(unknown)}")
        self.loss_weights = LossWeights(**weights)
        self.optim_cfg = dict(optim)
        self.scheduler_cfg = dict(scheduler) if scheduler else None
        self.image_every_n_steps = int(image_every_n_steps)
        self.image_dir = Path(image_dir) if image_dir else None
        self.torch_compile = _switch("torch_compile", torch_compile)
        self.channels_last = _switch("channels_last", channels_last)
        self._channels_last_active = False  # set by optimize_for
        self._compiled = False
        self.batch_step = 0
        self.voxel_size_nm: tuple[float, float, float] | None = None  # of the LM training data, (z, y, x) nm
        # How LM (ExM) input was normalised in training ({"intensity_range": [lo, hi] | None, "percentiles": ...});
        # translation applies the same rule so the generator sees the intensities it was trained on.
        self.lm_normalization: dict[str, list[float] | None] | None = None

    # ------------------------------------------------------------------ inference
    def forward(self, a: Tensor) -> Tensor:
        """Translate ExM ``(B, 1, Z, Y, X)`` in [0, 1] to virtual EM (same shape, unclipped)."""
        return self.G_AB(a)

    def predict_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """Translate a batch: a tensor or a dict with key ``"A"``; returns fake EM ``(B, 1, Z, Y, X)``."""
        a = batch["A"] if isinstance(batch, Mapping) else batch
        return self.G_AB(a)

    def check_patch(self, patch: Sequence[int]) -> None:
        """Raise a one-line ValueError if a ``(Z, Y, X)`` patch does not fit the U-Net depth."""
        self.G_AB.check_input_shape(patch)

    # ------------------------------------------------------------------ performance
    def optimize_for(self, device: torch.device | str) -> None:
        """Apply the performance switches for training on ``device``; the maths does not change.

        ``channels_last``: the networks' 5-D weights (and, in :meth:`train_batch`, the batches) go to
        ``torch.channels_last_3d``. ``torch_compile``: each network is compiled in place (``nn.Module.compile``,
        so state-dict keys stay as they are). ``"auto"`` switches are on for a CUDA device. Called by Lightning
        through :meth:`configure_model`; call it yourself before a plain PyTorch loop. Idempotent.
        """
        device = torch.device(device)
        nets = (self.G_AB, self.G_BA, self.D_A, self.D_B)
        if _resolve(self.channels_last, device) and not self._channels_last_active:
            for net in nets:
                net.to(memory_format=torch.channels_last_3d)
            self._channels_last_active = True
        if _resolve(self.torch_compile, device) and not self._compiled:
            for net in nets:
                net.compile()
            self._compiled = True
        log.debug(
            "performance switches on %s: channels_last_3d=%s, torch.compile=%s",
            device,
            self._channels_last_active,
            self._compiled,
        )

    def configure_model(self) -> None:
        """Lightning hook: :meth:`optimize_for` the device the trainer runs this process on."""
        self.optimize_for(self.trainer.strategy.root_device)

    # ------------------------------------------------------------------ optimizers
    def _optimizer_flags(self) -> dict[str, bool]:
        """``foreach``/``fused`` for the optimizers: as configured, or (both null) fused Adam/AdamW on the CPU and
        CUDA (several times faster than the per-tensor loop, same update rule), foreach elsewhere. Fused kernels
        cannot be combined with Lightning's gradient clipping under mixed precision, so ``grad_clip`` gets
        foreach."""
        cfg = self.optim_cfg
        flags = {k: bool(cfg[k]) for k in ("foreach", "fused") if cfg.get(k) is not None}
        if flags:
            return flags
        device = next(self.parameters()).device
        if device.type in _FUSED_DEVICES and not cfg.get("grad_clip"):
            return {"fused": True}
        return {"foreach": True}

    def configure_optimizers(self) -> tuple[list, list]:
        cfg = self.optim_cfg
        name = str(cfg.get("name", "adam")).lower()
        if name not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(_OPTIMIZERS)}")
        kwargs: dict[str, Any] = {
            "lr": float(cfg.get("lr", 3e-4)),  # published; not multiplied by the batch size
            "betas": tuple(cfg.get("betas", (0.5, 0.999))),  # the published betas, as conf/model/exem.yaml
            "weight_decay": float(cfg.get("weight_decay", 0.0)),
        }
        kwargs.update(self._optimizer_flags())
        opt_cls = _OPTIMIZERS[name]
        opt_g = opt_cls(list(self.G_AB.parameters()) + list(self.G_BA.parameters()), **kwargs)
        opt_da = opt_cls(self.D_A.parameters(), **kwargs)
        opt_db = opt_cls(self.D_B.parameters(), **kwargs)
        optimizers = [opt_g, opt_da, opt_db]
        if not self.scheduler_cfg:
            return optimizers, []
        s = self.scheduler_cfg
        if s.get("name") != "cosine_warm_restarts":
            raise ValueError(f"unknown scheduler {s.get('name')!r}; use cosine_warm_restarts or null")
        schedulers = [
            {
                "scheduler": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                    opt,
                    T_0=int(s["T_0"]),
                    T_mult=int(s.get("T_mult", 1)),
                    eta_min=float(s.get("eta_min_fraction", 0.0)) * kwargs["lr"],
                ),
                "interval": "step",
                "name": f"lr-{tag}",
            }
            for opt, tag in zip(optimizers, ("G", "D_A", "D_B"), strict=True)
        ]
        return optimizers, schedulers

    # ------------------------------------------------------------------ training
    def content_weight(self) -> float:
        """λ_content · 2^(−batch_step / decay_steps)."""
        w = self.loss_weights
        return w.lambda_content * float(content_decay(self.batch_step, w.content_decay_steps))

    def generator_losses(self, real_a: Tensor, real_b: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """All generator loss terms for one batch, and the generated images ``fake_b, rec_a, fake_a, rec_b``."""
        w = self.loss_weights
        fake_b = self.G_AB(real_a)
        rec_a = self.G_BA(fake_b)
        fake_a = self.G_BA(real_b)
        rec_b = self.G_AB(fake_a)
        terms: dict[str, Tensor] = {
            "adv_AB": lsgan_loss(self.D_B(fake_b), 1.0),
            "adv_BA": lsgan_loss(self.D_A(fake_a), 1.0),
            "cycle": cycle_loss(rec_a, real_a) + cycle_loss(rec_b, real_b),
        }
        total = w.lambda_gan * (terms["adv_AB"] + terms["adv_BA"])
        total = total + w.lambda_cycle * terms["cycle"]
        w_content = self.content_weight()
        if w.lambda_content > 0:
            terms["content"] = self.content_loss(real_a, fake_b, real_b, fake_a)
            total = total + w_content * terms["content"]
        if w.lambda_identity > 0:
            terms["identity"] = identity_loss(self.G_AB(real_b), real_b) + identity_loss(
                self.G_BA(real_a), real_a
            )
            total = total + w.lambda_identity * terms["identity"]
        terms["total"] = total
        images = {"fake_b": fake_b, "rec_a": rec_a, "fake_a": fake_a, "rec_b": rec_b}
        return terms, images

    def _step(self, opt: Any, loss: Tensor) -> None:
        """zero_grad(set_to_none) → backward → optional gradient-norm clipping → optimizer step."""
        opt.zero_grad(set_to_none=True)
        clip = self.optim_cfg.get("grad_clip")
        if self._trainer is not None:  # Lightning: precision plugin, strategy (DDP), hooks
            self.manual_backward(loss)
            if clip:
                self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        else:  # a plain PyTorch loop
            loss.backward()
            if clip:
                params = [p for group in opt.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, float(clip))
        opt.step()

    def train_batch(
        self,
        real_a: Tensor,
        real_b: Tensor,
        optimizers: Sequence[Any],
        schedulers: Sequence[Any] = (),
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The maths of one training batch: G step, D_A step, D_B step, then the schedulers; advances
        :attr:`batch_step`.

        Used by :meth:`training_step` under a Lightning Trainer, and callable from a plain PyTorch loop with the
        optimizers (and schedulers) of :meth:`configure_optimizers`. It never waits for the device: no
        ``.item()``, ``.cpu()`` or ``float(tensor)``.

        Args:
            real_a: ExM batch ``(B, 1, Z, Y, X)`` in [0, 1].
            real_b: EM batch ``(B, 1, Z, Y, X)`` in [0, 1].
            optimizers: ``(opt_G, opt_D_A, opt_D_B)``.
            schedulers: learning-rate schedulers stepped once after the batch.

        Returns:
            ``(losses, images)``: detached scalar losses (the generator terms ``adv_AB``, ``adv_BA``, ``cycle``,
            [``content``], [``identity``], ``total``, and ``D_A``, ``D_B``) and the generated volumes
            ``fake_b``, ``rec_a``, ``fake_a``, ``rec_b``.
        """
        opt_g, opt_da, opt_db = optimizers
        if self._channels_last_active:
            real_a = real_a.contiguous(memory_format=torch.channels_last_3d)
            real_b = real_b.contiguous(memory_format=torch.channels_last_3d)

        with _frozen(self.D_A, self.D_B):  # no weight gradients for the discriminators in the G step
            g_terms, images = self.generator_losses(real_a, real_b)
            self._step(opt_g, g_terms["total"])

        fake_a = self.pool_A(images["fake_a"].detach())
        loss_da = discriminator_loss(self.D_A(real_a), self.D_A(fake_a))
        self._step(opt_da, loss_da)

        fake_b = self.pool_B(images["fake_b"].detach())
        loss_db = discriminator_loss(self.D_B(real_b), self.D_B(fake_b))
        self._step(opt_db, loss_db)

        for sch in schedulers:
            sch.step()
        self.batch_step += 1
        losses = {k: v.detach() for k, v in g_terms.items()}
        losses["D_A"] = loss_da.detach()
        losses["D_B"] = loss_db.detach()
        return losses, images

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        real_a, real_b = batch["A"], batch["B"]
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers() or []
        if not isinstance(schedulers, list):
            schedulers = [schedulers]
        content_weight = self.content_weight()  # of this batch (before batch_step advances)
        losses, images = self.train_batch(real_a, real_b, optimizers, schedulers)
        if self._logging_due():
            self._log_train(losses, content_weight, optimizers[0].param_groups[0]["lr"], real_a.shape[0])
        if self.image_every_n_steps and self.batch_step % self.image_every_n_steps == 0:
            self.log_panel(real_a, real_b, images, tag="train")

    def _logging_due(self) -> bool:
        """True when the Trainer writes step metrics after this batch (every ``log_every_n_steps`` batches)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log_train(
        self, losses: Mapping[str, Tensor], content_weight: float, lr: float, batch_size: int
    ) -> None:
        """Log the training losses: one device→host copy for all of them, at logging intervals only.

        The values are logged as CPU tensors, so that Lightning's per-batch progress-bar update (which turns the
        last logged values into numbers at every batch) does not wait for the device either.
        """
        names = list(losses)
        values = torch.stack([losses[k].float() for k in names]).cpu()
        logs = {
            (f"train/{k}" if k in ("D_A", "D_B") else f"train/G_{k}"): v
            for k, v in zip(names, values, strict=True)
        }
        total = logs.pop("train/G_total")
        logs["train/content_weight"] = torch.tensor(float(content_weight))
        logs["train/lr"] = torch.tensor(float(lr))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/G_total", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        real_a, real_b = batch["A"], batch["B"]
        fake_b = self.G_AB(real_a)
        rec_a = self.G_BA(fake_b)
        fake_a = self.G_BA(real_b)
        rec_b = self.G_AB(fake_a)
        n = real_a.shape[0]
        q_a = image_quality(rec_a.clamp(0, 1), real_a)
        q_b = image_quality(rec_b.clamp(0, 1), real_b)
        metrics = {
            "val/cycle_psnr": (q_a["psnr"] + q_b["psnr"]) / 2,
            "val/cycle_ssim": (q_a["ssim"] + q_b["ssim"]) / 2,
            "val/cycle_l1": cycle_loss(rec_a, real_a) + cycle_loss(rec_b, real_b),
        }
        if "B_paired" in batch:
            q = image_quality(fake_b.clamp(0, 1), batch["B_paired"])
            metrics["val/paired_psnr"] = q["psnr"]
            metrics["val/paired_ssim"] = q["ssim"]
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        if batch_idx == 0:
            images = {"fake_b": fake_b, "rec_a": rec_a, "fake_a": fake_a, "rec_b": rec_b}
            self.log_panel(real_a, real_b, images, tag="val")

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_panel(self, real_a: Tensor, real_b: Tensor, images: Mapping[str, Tensor], tag: str) -> None:
        """Middle-Z slices (first sample) of real/fake/recovered in both directions, to PNG and to the logger."""
        if self.trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        panel = translation_panel(
            [real_a, images["fake_b"], images["rec_a"]], [real_b, images["fake_a"], images["rec_b"]]
        )
        if self.image_dir is not None:
            path = save_panel(panel, self.image_dir / f"{tag}_step{self.batch_step:07d}.png")
            log.debug("wrote %s", path)
        self._log_image_to_loggers(f"{tag}/panel", panel)

    def _log_image_to_loggers(self, key: str, panel: np.ndarray) -> None:
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard
                exp.add_image(key, panel, self.batch_step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # wandb and friends
                logger.log_image(key=key, images=[panel], step=self.global_step)

    # ------------------------------------------------------------------ content groups
    def use_content_groups(self, fit: ContentGroups) -> None:
        """Train with ``fit``'s groups: rebuild the content loss and record the fit in the hyper-parameters
        (``loss.content``), so checkpoints carry it and a resume reuses it."""
        self.content_loss = IntensityGroupContentLoss(
            lm_thresholds=fit.lm_thresholds,
            em_thresholds=fit.em_thresholds,
            slope=self.content_loss.slope,
            lm_to_em=fit.lm_to_em,
            em_to_lm=fit.em_to_lm,
        )
        self.content_groups = fit
        content = self.hparams["loss"].setdefault("content", {})
        content.update(fit.as_config())

    def fit_content_groups(self, datamodule: Any) -> ContentGroups:
        """Fit the content groups to ``datamodule``'s training data (rank 0; every rank gets rank 0's fit), use
        them, write ``content_groups.json`` / ``.png`` to :attr:`report_dir` and log one line.

        Raises:
            CalibrationError: data the groups cannot be fitted to (one line).
        """
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        fit: ContentGroups | None = None
        error: str | None = None
        if trainer is None or trainer.is_global_zero:
            try:
                result = fit_from_datamodule(datamodule, self.content_settings)
                fit = result.fit
                if self.report_dir is not None:
                    write_content_groups(self.report_dir, fit, *result.pictures())
            except CalibrationError as exc:
                error = str(exc)
        if strategy is not None and trainer is not None and trainer.world_size > 1:
            fit, error = strategy.broadcast((fit, error), src=0)
        if error is not None or fit is None:
            raise CalibrationError(error or "content groups: no fit")
        self.use_content_groups(fit)
        where = f" ({self.report_dir / 'content_groups.png'})" if self.report_dir is not None else ""
        log.info("content groups fitted from the data: %s%s", fit.describe(), where)
        return fit

    # ------------------------------------------------------------------ checkpoint state
    def on_fit_start(self) -> None:
        """Remember the LM voxel size and normalisation the generator is trained with, for translation later;
        fit the content groups (``loss.content.auto``) unless a checkpoint brought a fit."""
        datamodule = getattr(self.trainer, "datamodule", None) if self.trainer else None
        if self.content_settings.auto and self.content_groups is None:
            if hasattr(datamodule, "intensity_sample"):
                self.fit_content_groups(datamodule)
            else:
                log.warning(
                    "content groups not fitted (model.loss.content.auto=true needs an ExEMDataModule, this fit has"
                    " plain data loaders): training with the configured thresholds and mapping %s; set"
                    " model.loss.content.auto=false to say so",
                    self.content_loss.extra_repr(),
                )
        volumes = getattr(datamodule, "lm_volumes", None)
        if volumes and volumes[0].voxel_size_nm is not None:
            self.voxel_size_nm = tuple(float(v) for v in volumes[0].voxel_size_nm)
        lm_cfg = getattr(datamodule, "lm_cfg", None)
        if lm_cfg is not None:
            self.lm_normalization = {
                key: (None if lm_cfg.get(key) is None else [float(v) for v in lm_cfg.get(key)])
                for key in ("intensity_range", "percentiles")
            }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["exem_batch_step"] = self.batch_step
        checkpoint["exem_voxel_size_nm"] = list(self.voxel_size_nm) if self.voxel_size_nm else None
        checkpoint["exem_lm_normalization"] = self.lm_normalization
        # The global random state (replay-buffer draws), so a resumed run continues the uninterrupted one exactly.
        # All ranks are seeded alike and draw alike, so rank 0's state (the one saved) stands for every rank.
        checkpoint["exem_rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batch_step = int(checkpoint.get("exem_batch_step", 0))
        stored = (checkpoint.get("hyper_parameters") or {}).get("loss", {}).get("content") or {}
        fit = ContentGroups.from_config(stored)
        if fit is not None:  # a resume keeps the groups it was trained with; never refits
            self.use_content_groups(fit)
        vs = checkpoint.get("exem_voxel_size_nm")
        self.voxel_size_nm = tuple(float(v) for v in vs) if vs else None
        self.lm_normalization = checkpoint.get("exem_lm_normalization")
        if self._trainer is not None and checkpoint.get(
            "exem_rng_state"
        ):  # resuming training, not just loading
            set_rng_state(checkpoint["exem_rng_state"])
