"""ExEMModule: the ExM→EM CycleGAN as a LightningModule with manual optimization.

Domains: A = light microscopy (ExM), B = electron microscopy. Generators G_AB (ExM→EM) and G_BA (EM→ExM) are
:class:`~exem.models.AnisotropicUNet3D`; discriminators D_A and D_B are
:class:`~exem.models.MultiScaleDiscriminator3D`. All tensors are ``(B, 1, Z, Y, X)`` float with intensities
normalised to [0, 1]. Batches are the data module's dicts ``{"lm": A, "em": B}`` (validation adds ``"em_paired"``).

Each training batch does, in order: one generator step (both generators, one optimizer), one D_A step, one D_B
step. Lightning's ``trainer.global_step`` therefore advances by 3 per batch; the content-loss decay is driven by
:attr:`ExEMModule.batch_step`, a batch counter kept in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from exem.callbacks import rng_state, set_rng_state
from exem.content_groups import (
    RECORD_KEYS,
    CalibrationError,
    ContentFitSettings,
    ContentGroups,
    fit_from_datamodule,
    write_content_groups,
)
from exem.ddp import GradientTraffic, kept_per_rank, register_trainable_allreduce
from exem.gloo_exit import destroy_gloo_at_exit
from exem.losses import (
    IntensityGroupContentLoss,
    LossWeights,
    content_decay,
    cycle_loss,
    discriminator_loss,
    identity_loss,
    lsgan_loss,
)
from exem.nodes import call, complete, plain
from exem.optim import make_optimizers, make_schedulers, optimizer_node, scheduler_node
from exem.panels import save_panel, translation_panel
from exem.perf import PerfSwitches, frozen
from exem.replay import ReplayBuffer, load_rank_pools, save_rank_pools
from exem.training_logs import ValidationMeans, counted_metrics, log_image, logging_due, train_logs

__all__ = ["GENERATOR", "DISCRIMINATOR", "ExEMModule", "LossWeights", "ReplayBuffer"]

log = logging.getLogger(__name__)

# The networks' nodes when none (or one without a _target_) is given: the classes with their own defaults, which
# are the published ones.
GENERATOR: dict[str, Any] = {"_target_": "exem.models.unet.AnisotropicUNet3D"}
DISCRIMINATOR: dict[str, Any] = {"_target_": "exem.models.discriminator.MultiScaleDiscriminator3D"}


class ExEMModule(L.LightningModule):
    """The ExEM 3D CycleGAN. Every argument has the published value by default, so ``ExEMModule()`` is the
    published model; conf/model/exem.yaml states the same values.

    Args:
        generator: node of G_AB and G_BA (:mod:`exem.nodes`): ``_target_`` (default
            :class:`~exem.models.unet.AnisotropicUNet3D`) and its keyword arguments. Without a ``_target_`` the
            keys are arguments of the default class (``{"widths": [8, 16, 32]}``).
        discriminator: node of D_A and D_B, likewise (default :class:`~exem.models.MultiScaleDiscriminator3D`).
        loss: :class:`LossWeights` fields ``lambda_gan``, ``lambda_cycle``, ``lambda_identity``,
            ``lambda_content``, the decay ``content_decay_steps`` (batches; missing ones take the published values)
            and ``content``: keyword arguments of
            :class:`IntensityGroupContentLoss` and of :class:`~exem.content_groups.ContentFitSettings` (``auto``:
            fit the groups from the training data before the first step, see :meth:`fit_content_groups`). A fit
            stored there (a checkpoint's hyper-parameters) is used as it is and never refitted.
        optimizer: optimizer partial, called with each network group's parameters (:mod:`exem.optim`): a node
            with a ``_target_`` (``torch.optim.AdamW``, ...) as given; otherwise the published Adam (lr 3e-4,
            betas (0.5, 0.999)) with the given keys changed. ``foreach``/``fused`` null: chosen per device.
        scheduler: None, or a learning-rate scheduler partial called with each optimizer and stepped once per
            batch (``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` with ``T_0``, ``T_mult``, ``eta_min``).
        grad_clip: maximum gradient norm of each optimizer step (None or 0 = no clipping).
        replay_buffer_size: size of each discriminator's replay pool (0 = off).
        torch_compile: ``torch.compile`` each of the four networks (True, False or ``"auto"`` = on a CUDA GPU, the
            default). Same maths; the first steps pay the compilation; a failure falls back to eager with a warning.
        channels_last: keep weights and batches in ``torch.channels_last_3d`` memory format (True, False or
            ``"auto"`` = on a CUDA GPU). Same maths.
        image_every_n_steps: write an image panel every N batches (0 = never).
        image_dir: folder for the PNG panels (None = only the logger gets them).
        report_dir: the run folder, where ``content_groups.json`` / ``.png`` go when the groups are fitted
            (None = not written).
    """

    def __init__(
        self,
        generator: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        grad_clip: float | None = None,
        replay_buffer_size: int = 0,
        image_every_n_steps: int = 0,
        image_dir: str | None = None,
        torch_compile: bool | str = "auto",
        channels_last: bool | str = False,
        report_dir: str | None = None,
    ) -> None:
        super().__init__()
        # The nodes as used, in plain containers, so checkpoints load with torch.load(weights_only=True)
        # (save_hyperparameters reads these locals).
        generator, discriminator = complete(generator, GENERATOR), complete(discriminator, DISCRIMINATOR)
        loss, optimizer = dict(plain(loss) or {}), optimizer_node(optimizer)
        scheduler = scheduler_node(scheduler, optimizer.get("lr"))
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.G_AB, self.G_BA = (call(generator, "model.generator") for _ in range(2))
        self.D_A, self.D_B = (call(discriminator, "model.discriminator") for _ in range(2))
        self.content_settings, content_kwargs = ContentFitSettings.split(loss.get("content"))
        # A fit stored in the hyper-parameters (loaded from a checkpoint) is reused as it is.
        self.content_groups: ContentGroups | None = ContentGroups.from_config(content_kwargs)
        for key in RECORD_KEYS:
            content_kwargs.pop(key, None)
        self.content_loss = IntensityGroupContentLoss(**content_kwargs)
        self.report_dir = Path(report_dir) if report_dir else None
        self.pool_A = ReplayBuffer(replay_buffer_size)
        self.pool_B = ReplayBuffer(replay_buffer_size)
        kept_per_rank(self, ["pool_A", "pool_B"])  # under DDP each rank keeps its own pools
        self.loss_weights = LossWeights.from_config(loss)
        self.optimizer_node, self.scheduler_node = optimizer, scheduler
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.image_every_n_steps = int(image_every_n_steps)
        self.image_dir = Path(image_dir) if image_dir else None
        self.perf = PerfSwitches(torch_compile, channels_last)  # applied by optimize_for
        self.batch_step = 0
        self._val_means = ValidationMeans()  # of the running validation epoch
        self.voxel_size_nm: tuple[float, float, float] | None = None  # of the LM training data, (z, y, x) nm
        # How LM (ExM) input was normalised in training ({"intensity_range": [lo, hi] | None, "percentiles": ...});
        # translation applies the same rule so the generator sees the intensities it was trained on.
        self.lm_normalization: dict[str, list[float] | None] | None = None
        # The (z, y, x) training patch: the default patch of translation (GroupNorm statistics depend on it).
        self.training_patch: tuple[int, int, int] | None = None
        # Under DDP, the gradient buckets all-reduced and skipped (exem/ddp.py); None otherwise.
        self.gradient_traffic: GradientTraffic | None = None

    # ------------------------------------------------------------------ inference
    def forward(self, lm: Tensor) -> Tensor:
        """Translate ExM ``(B, 1, Z, Y, X)`` in [0, 1] to virtual EM (same shape, unclipped)."""
        return self.G_AB(lm)

    def predict_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """Translate a batch: a tensor or a dict with key ``"lm"``; returns fake EM ``(B, 1, Z, Y, X)``."""
        lm = batch["lm"] if isinstance(batch, Mapping) else batch
        return self.G_AB(lm)

    def check_patch(self, patch: Sequence[int]) -> None:
        """Raise a one-line ValueError if a ``(Z, Y, X)`` patch does not fit the U-Net depth."""
        self.G_AB.check_input_shape(patch)

    # ------------------------------------------------------------------ performance
    def optimize_for(self, device: torch.device | str) -> None:
        """Apply the performance switches (:class:`~exem.perf.PerfSwitches`) for training on ``device``; the
        maths does not change. Called by Lightning through :meth:`configure_model`; call it yourself before a
        plain PyTorch loop. Idempotent."""
        self.perf.apply((self.G_AB, self.G_BA, self.D_A, self.D_B), device)

    def configure_model(self) -> None:
        """Lightning hook: :meth:`optimize_for` the device the trainer runs this process on (nothing without a
        trainer, as in ``load_from_checkpoint``)."""
        if self._trainer is not None:
            self.optimize_for(self._trainer.strategy.root_device)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> tuple[list, list]:
        """``[opt_G (G_AB + G_BA), opt_D_A, opt_D_B]`` and their schedulers (none without ``scheduler``)."""
        generators = [*self.G_AB.parameters(), *self.G_BA.parameters()]
        groups = (generators, self.D_A.parameters(), self.D_B.parameters())
        device = next(self.parameters()).device
        optimizers = make_optimizers(self.optimizer_node, groups, device, self.grad_clip)
        return optimizers, make_schedulers(self.scheduler_node, optimizers, ("G", "D_A", "D_B"))

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
        if self._trainer is not None:  # Lightning: precision plugin, strategy (DDP), hooks
            self.manual_backward(loss)
            if self.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        else:  # a plain PyTorch loop
            loss.backward()
            if self.grad_clip:
                params = [p for group in opt.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
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
        if self.perf.channels_last_active:
            real_a = real_a.contiguous(memory_format=torch.channels_last_3d)
            real_b = real_b.contiguous(memory_format=torch.channels_last_3d)

        with frozen(self.D_A, self.D_B):  # no weight gradients for the discriminators in the G step
            g_terms, images = self.generator_losses(real_a, real_b)
            self._step(opt_g, g_terms["total"])

        # Each D step sees detached fakes: the other networks are frozen only so that DDP all-reduces the
        # trained network's gradients alone (exem/ddp.py); the maths is the same.
        with frozen(self.G_AB, self.G_BA, self.D_B):
            fake_a = self.pool_A(images["fake_a"].detach())
            loss_da = discriminator_loss(self.D_A(real_a), self.D_A(fake_a))
            self._step(opt_da, loss_da)

        with frozen(self.G_AB, self.G_BA, self.D_A):
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
        real_a, real_b = batch["lm"], batch["em"]
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers() or []
        if not isinstance(schedulers, list):
            schedulers = [schedulers]
        content_weight = self.content_weight()  # of this batch (before batch_step advances)
        losses, images = self.train_batch(real_a, real_b, optimizers, schedulers)
        if logging_due(self._trainer):
            logs = train_logs(losses, content_weight, optimizers[0].param_groups[0]["lr"])
            total, n = logs.pop("train/G_total"), real_a.shape[0]
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n)
            self.log("train/G_total", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        if self.image_every_n_steps and self.batch_step % self.image_every_n_steps == 0:
            self.log_panel(real_a, real_b, images, tag="train")

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_means = ValidationMeans()

    def on_validation_epoch_end(self) -> None:
        """Log the means over every rank's counted patches (the same values on every rank: no ``sync_dist``)."""
        strategy = self.trainer.strategy
        means = self._val_means.means(lambda t: strategy.reduce(t, reduce_op="sum"))
        self.log_dict(means, on_step=False, on_epoch=True)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        real_a, real_b = batch["lm"], batch["em"]
        fake_b = self.G_AB(real_a)
        rec_a = self.G_BA(fake_b)
        fake_a = self.G_BA(real_b)
        rec_b = self.G_AB(fake_a)
        self._val_means.add(*counted_metrics(batch, rec_a, rec_b, fake_b))
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
        log_image(self.loggers, f"{tag}/panel", panel, self.batch_step, self.global_step)

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
            OtherRankError: under DDP, on the other ranks when rank 0 failed otherwise (it raises its own error).
        """
        from exem.inference.ranks import error_line, peer_error  # zarr and the output's markers: only here

        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        world = int(trainer.world_size) if trainer is not None and strategy is not None else 1
        fit: ContentGroups | None = None
        error: str | None = None
        failed: Exception | None = None  # rank 0's error other than CalibrationError (told, then re-raised)
        if trainer is None or trainer.is_global_zero:
            try:
                result = fit_from_datamodule(datamodule, self.content_settings)
                fit = result.fit
                if self.report_dir is not None:
                    write_content_groups(self.report_dir, fit, *result.pictures())
            except CalibrationError as exc:
                error = str(exc)
            except Exception as exc:
                if world <= 1:
                    raise
                # told to the others below: they must not wait for a broadcast that never comes
                failed, error = exc, error_line(exc)
        if world > 1:
            fit, error, other = strategy.broadcast((fit, error, failed is not None), src=0)
            if failed is not None:
                raise failed
            if other:
                raise peer_error({0: error or ""}, world, "while fitting the content groups")
        if error is not None or fit is None:
            raise CalibrationError(error or "content groups: no fit")
        self.use_content_groups(fit)
        where = f" ({self.report_dir / 'content_groups.png'})" if self.report_dir is not None else ""
        log.info("content groups fitted from the data: %s%s", fit.describe(), where)
        return fit

    # ------------------------------------------------------------------ checkpoint state
    def on_fit_start(self) -> None:
        """Remember the LM voxel size and normalisation the generator is trained with, for translation later;
        fit the content groups (``loss.content.auto``) unless a checkpoint brought a fit; under DDP, all-reduce
        only the gradients of the networks each step trains (:mod:`exem.ddp`), and destroy a gloo process group
        before the interpreter exits (:mod:`exem.gloo_exit`)."""
        destroy_gloo_at_exit()
        if self._trainer is not None:
            self.gradient_traffic = register_trainable_allreduce(
                getattr(self._trainer.strategy, "model", None)
            )
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
        patch = getattr(datamodule, "patch_size", None)
        if patch is not None:
            self.training_patch = tuple(int(v) for v in patch)  # type: ignore[assignment]
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
        checkpoint["exem_training_patch"] = list(self.training_patch) if self.training_patch else None
        # The global random state (replay-buffer draws), so a resumed run continues the uninterrupted one exactly.
        # All ranks are seeded alike and draw alike, so rank 0's state (the one saved) stands for every rank.
        checkpoint["exem_rng_state"] = rng_state()
        if self._trainer is not None:  # under DDP, each rank's replay pools (the state dict holds rank 0's)
            pools = {"pool_A": self.pool_A, "pool_B": self.pool_B}
            save_rank_pools(checkpoint, pools, self._trainer.strategy, self._trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batch_step = int(checkpoint.get("exem_batch_step", 0))
        stored = (checkpoint.get("hyper_parameters") or {}).get("loss", {}).get("content") or {}
        fit = ContentGroups.from_config(stored)
        if fit is not None:  # a resume keeps the groups it was trained with; never refits
            self.use_content_groups(fit)
        vs = checkpoint.get("exem_voxel_size_nm")
        self.voxel_size_nm = tuple(float(v) for v in vs) if vs else None
        self.lm_normalization = checkpoint.get("exem_lm_normalization")
        patch = checkpoint.get("exem_training_patch")
        self.training_patch = tuple(int(v) for v in patch) if patch else None  # type: ignore[assignment]
        if self._trainer is not None and checkpoint.get("exem_rng_state"):  # resuming training, not loading
            set_rng_state(checkpoint["exem_rng_state"])
        if self._trainer is not None:  # this rank's replay pools, before Lightning loads the state dict
            load_rank_pools(checkpoint, self._trainer.global_rank, self._trainer.world_size)
