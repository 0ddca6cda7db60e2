"""Teacher training: flow matching on real clips with control and text (CFG-ready).

The training loop (micro-batches, clipping, the non-finite policy, the learning-rate warm-up's
steps, logging, checkpoint hooks) is the one of every stage,
:class:`~distill_pl.training.base.StageModule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from distill_pl.training.base import StageModule
from distill_pl.training.batch import (
    batch_pixels,
    check_precomputed_latents,
    clip_latent_shape,
    draw_text_drop,
    drop_text,
    encode_clip_batch,
)
from distill_pl.training.nonfinite import NonFinitePolicy
from distill_pl.util.randomness import step_generator

#: checkpoint key of the non-finite policy's counters
NONFINITE_KEY = "nonfinite"


@dataclass
class TeacherDraws:
    """A step's draws for the samples of a batch: text dropout (None: no dropout), sigma, noise."""

    drop: Tensor | None
    sigma: Tensor
    eps: Tensor

    def rows(self, rows: slice) -> "TeacherDraws":
        return TeacherDraws(None if self.drop is None else self.drop[rows], self.sigma[rows], self.eps[rows])


class TeacherTrainingModule(StageModule):
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
        accumulate_micro_batches: micro-batches per optimizer step: each loaded batch (the data
            batch size, per device) is split into this many, of sizes that differ by at most
            one, each with its own forward and backward (gradient accumulation). The step's
            draws are made for the whole batch, so they do not depend on it.
        grad_clip: max total gradient norm of the denoiser (None: no clipping; the norm is
            logged either way as ``train/grad_norm_denoiser``).
        compile: regional compilation (``torch.compile`` of each transformer block, see
            :meth:`~distill_pl.models.denoiser.Denoiser.compile_blocks`) of the denoiser, at the
            start of fit (after any sharding); the first steps then take the compile time.
    """

    stage_name = "teacher training"
    checkpoint_name = "teacher"
    nonfinite_key = NONFINITE_KEY
    compiled_networks = ("denoiser",)

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
        accumulate_micro_batches: int = 1,
        grad_clip: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser"])
        if accumulate_micro_batches < 1:
            raise ValueError(f"accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")
        self.nonfinite = NonFinitePolicy("teacher training", max_nonfinite_steps)
        self.denoiser = denoiser
        self.autoencoder = build_autoencoder(vae_path)
        self.negative_prompt = NegativePrompt()

    # --- conditioning -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)  # refuses fp16
        self.negative_prompt.set_from(getattr(self.trainer, "datamodule", None))
        check_precomputed_latents(getattr(self.trainer, "datamodule", None), self.hparams.vae_path)

    def set_negative_prompt(self, embeds: Tensor, mask: Tensor) -> None:
        """The [1, L, D] embedding (+ [1, L] mask) used for text dropout and CFG."""
        self.negative_prompt.set(embeds, mask)

    def null_conditioning(self, cond: Conditioning) -> Conditioning:
        return self.negative_prompt.conditioning(cond)

    # --- training -----------------------------------------------------------------------
    def phase_optimizer(self, phase: int) -> tuple[int, dict[str, torch.nn.Module], float | None]:
        return 0, {"denoiser": self.denoiser}, self.hparams.grad_clip

    def phase_draws(self, phase: int, batch: dict, step: int) -> TeacherDraws:
        """Text dropout, sigma and noise of the whole batch from ``step_generator(seed, step)``."""
        g = step_generator(self.hparams.seed, step)
        shape = clip_latent_shape(batch, self.autoencoder, self.denoiser.latent_channels)
        p = self.hparams.text_dropout
        drop = draw_text_drop(shape[0], p, generator=g) if p > 0 else None
        sigma = sample_training_sigma(shape[0], self.hparams.shift, generator=g)
        eps = torch.randn(shape, generator=g, device=g.device)
        return TeacherDraws(drop, sigma, eps)

    def phase_loss(self, phase: int, batch: dict, draws: TeacherDraws) -> tuple[Tensor, dict[str, Tensor]]:
        """The flow-matching loss of a (micro-)batch of clips with its rows of the draws."""
        x0, cond = encode_clip_batch(batch, self.autoencoder, self.denoiser)
        cond = drop_text(cond, self.null_conditioning(cond), self.hparams.text_dropout, drop=draws.drop)
        sigma, eps = draws.sigma.to(x0), draws.eps.to(x0)
        loss = flow_matching_loss(lambda x, s: self.denoiser(x, s, cond), x0, eps, sigma)
        return loss, {"loss": loss}

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

    def export(self, export_dir: str) -> None:
        if self.trainer.is_global_zero:
            folder = save_teacher_folder(export_dir, self.denoiser, self.hparams.scheduler, self.hparams.shift)
            print(f"teacher exported to {Path(folder).resolve()}")
