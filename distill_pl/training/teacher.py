"""Teacher training: flow matching on real clips with control and text (CFG-ready)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from distill_pl.diffusion.losses import flow_matching_loss, sample_training_sigma
from distill_pl.diffusion.sampling import SchedulerName, build_flow_scheduler, sample_with_scheduler
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.export.model_folders import save_teacher_folder
from distill_pl.training.batch import batch_pixels, check_precomputed_latents, drop_text, encode_clip_batch
from distill_pl.models.finite_weights import check_finite
from distill_pl.training.nonfinite import NonFinitePolicy, strategy_of
from distill_pl.util.randomness import randn, step_generator

#: checkpoint key of the non-finite policy's counters
NONFINITE_KEY = "nonfinite"


class TeacherTrainingModule(L.LightningModule):
    """Trains ``denoiser`` with the flow-matching loss ``mean((v(x_sigma) - (eps - x0))^2)``.

    Args:
        denoiser: the network to train (a :class:`Denoiser` adapter from
            :mod:`distill_pl.families` with a ``config``, as configs/tiny/teacher.yaml).
        vae_path: local diffusers folder of a video VAE; None trains in pixel space.
        lr, betas, weight_decay, warmup_steps: AdamW with linear warm-up, then constant.
        text_dropout: probability of replacing the prompt by the negative prompt ("" by
            default), which trains the unconditional branch used by CFG.
        shift: timestep shift applied to ``t ~ U[0, 1]`` in training and by the scheduler.
        seed: seeds the step-keyed noise, sigma and text-dropout draws (exact resume).
        scheduler, sample_steps, guidance: how samples are drawn for monitoring and export
            (guidance in the common form ``u + w (c - u)``).
        export_dir: if set, the trained teacher is written there at the end of fit as a
            folder with ``transformer/`` (diffusers, safetensors) and ``scheduler/``.
        max_nonfinite_steps: a step with a non-finite loss or gradient is skipped (no weight
            or optimizer state moves) and counted; this many in a row stop the run with an
            error (:mod:`distill_pl.training.nonfinite`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        vae_path: str | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        text_dropout: float = 0.1,
        shift: float = 1.0,
        scheduler: SchedulerName = "unipc",
        sample_steps: int = 36,
        guidance: float = 5.0,
        export_dir: str | None = None,
        seed: int = 0,
        max_nonfinite_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser"])
        self.nonfinite = NonFinitePolicy("teacher training", max_nonfinite_steps)
        self.denoiser = denoiser
        self.autoencoder = build_autoencoder(vae_path)
        self.negative_prompt = NegativePrompt()

    # --- conditioning -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.negative_prompt.set_from(getattr(self.trainer, "datamodule", None))
        check_precomputed_latents(getattr(self.trainer, "datamodule", None), self.hparams.vae_path)

    def set_negative_prompt(self, embeds: Tensor, mask: Tensor) -> None:
        """The [1, L, D] embedding (+ [1, L] mask) used for text dropout and CFG."""
        self.negative_prompt.set(embeds, mask)

    def null_conditioning(self, cond: Conditioning) -> Conditioning:
        return self.negative_prompt.conditioning(cond)

    # --- training -----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, cond = encode_clip_batch(batch, self.autoencoder, self.denoiser)
        g = step_generator(self.hparams.seed, self.global_step)
        cond = drop_text(cond, self.null_conditioning(cond), self.hparams.text_dropout, generator=g)
        sigma = sample_training_sigma(x0.shape[0], self.hparams.shift, generator=g).to(x0)
        eps = randn(x0.shape, g, x0)
        loss = flow_matching_loss(lambda x, s: self.denoiser(x, s, cond), x0, eps, sigma)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Flow-matching loss at fixed sigmas and fixed noise, comparable across runs."""
        x0, cond = encode_clip_batch(batch, self.autoencoder, self.denoiser)
        g = torch.Generator(device="cpu").manual_seed(batch_idx)
        losses = []
        for s in (0.25, 0.5, 0.75):
            eps = torch.randn(x0.shape, generator=g).to(x0)
            sigma = torch.full((x0.shape[0],), s, device=x0.device, dtype=x0.dtype)
            losses.append(flow_matching_loss(lambda x, t: self.denoiser(x, t, cond), x0, eps, sigma))
            self.log(f"val/loss_sigma{s}", losses[-1], batch_size=x0.shape[0])
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x0.shape[0])

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict, seed: int = 0, num_steps: int | None = None,
               guidance: float | None = None) -> Tensor:
        """N-step CFG samples for a batch, decoded to pixels [B, 3, T, H, W] in [-1, 1]."""
        x0, cond = encode_clip_batch(batch, self.autoencoder, self.denoiser)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        w = self.hparams.guidance if guidance is None else guidance
        fn = velocity_fn(self.denoiser, cond, self.null_conditioning(cond), w)
        scheduler = build_flow_scheduler(self.hparams.scheduler, self.hparams.shift)
        steps = num_steps or self.hparams.sample_steps
        return self.autoencoder.decode(sample_with_scheduler(fn, noise, scheduler, steps,
                                                              step_sigma=self.denoiser.sampler_sigma))

    def grid_rows(self, batch: dict, seed: int) -> dict[str, Tensor]:
        """Rows of the monitoring grid (see callbacks.FrameGridLogger)."""
        return {
            f"teacher {self.hparams.sample_steps}-step w={self.hparams.guidance}": self.sample(batch, seed),
            "control": batch_pixels(batch, "control", self.autoencoder),
            "ground truth": batch_pixels(batch, "video", self.autoencoder),
        }

    # --- optimisation and export ----------------------------------------------------------
    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_backward(self, loss: Tensor) -> None:
        self.nonfinite.observe_loss(loss)

    def on_before_optimizer_step(self, optimizer) -> None:
        """The non-finite policy: a non-finite loss or gradient drops the gradients."""
        self.nonfinite.guard_step(self, optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the non-finite counters; refuse non-finite weights."""
        check_finite(checkpoint["state_dict"], f"a teacher checkpoint at step {self.global_step}", strategy_of(self))
        checkpoint[NONFINITE_KEY] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.load_state_dict(checkpoint.get(NONFINITE_KEY, {}))

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            folder = save_teacher_folder(
                self.hparams.export_dir, self.denoiser, self.hparams.scheduler, self.hparams.shift
            )
            print(f"teacher exported to {Path(folder).resolve()}")
