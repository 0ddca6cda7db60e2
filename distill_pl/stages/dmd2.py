"""DMD2: distribution matching distillation of a CFG teacher into a one-step student.

Four networks (see DESIGN.md, "DMD2"):

- ``student``: the one-step generator ``x_g = eps - S(eps, 1, c)``; initialised from a KD
  checkpoint (``init_from``, EMA weights by default) or, without one, from the teacher.
- ``teacher``: the frozen N-step CFG teacher (the "real" score); eval mode, no gradients,
  in no optimizer and in no checkpoint.
- ``fake_score``: tracks the score of the student's samples; initialised from the teacher,
  trained with flow matching on detached student samples (optionally only LoRA adapters on
  the frozen teacher weights: ``fake_score_lora_rank``).
- ``discriminator``: a small head on the hidden states of block ``feature_block``, taken
  from the fake score network (default: shared backbone, as in the DMD2 paper) or from the
  frozen teacher (``discriminator_on="teacher"``, as in the reference recipe's code).

Alternation: exactly one optimizer step per ``training_step``. With
``phase = global_step % student_update_freq``, phases ``0 .. freq-2`` step the critic
optimizer (fake score + discriminator, two parameter groups) and phase ``freq-1`` steps the
student optimizer. Lightning counts every optimizer step in ``global_step``, so
``global_step`` = training steps, generator steps = ``global_step // freq``, and max_steps,
checkpoint intervals, logging and resume all count the same unit; the phase is a function
of the restored ``global_step``.

Gradient accumulation (``accumulate_micro_batches = N``): each loaded batch is split into N
micro-batches, each with its own forward and ``manual_backward`` before the one optimizer
step; under DDP the gradients are all-reduced in the backward of the last micro-batch only
(Lightning's ``block_backward_sync``, DDP's ``no_sync``, around the others). Every loss is a
mean over samples of per-sample terms (the DMD normaliser is per sample), so the micro-batch
losses weighted by their share of the batch sum to the full-batch loss, and the random draws
are per sample: N micro-batches give the update of one batch. Clipping and the non-finite
check act on the accumulated gradient.

Randomness: sample ``j`` of a rank's batch is sample ``rank + replicas * j`` of the global
batch (the layout of :class:`~distill_pl.data.resumable.EpochShuffleSampler`); its student
noise, ``t`` and fresh noises come from ``step_generator(seed, global_step, stream=that
index)``, so they depend neither on the number of devices nor on the micro-batches.

Non-finite losses or gradients: the shared policy of every stage
(:mod:`distill_pl.stages.nonfinite`). The update is skipped and counted. A skipped step still
calls ``optimizer.step()`` (so Lightning's step counter, and with it the phase, the data
position and the step-keyed randomness, stay in lockstep) but with every gradient set to
``None``, so nothing moves. ``max_nonfinite_steps`` consecutive skips stop the run with an
error, before any NaN reaches the weights or a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from types import SimpleNamespace
from typing import Literal

import lightning as L
from lightning.fabric.utilities.data import AttributeDict
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.utils import clip_grads_with_norm_

from distill_pl.data.resumable import data_parallel_layout
from distill_pl.diffusion.dmd import (
    dmd_gradient,
    dmd_loss,
    dmd_normaliser,
    gan_discriminator_loss,
    gan_generator_loss,
)
from distill_pl.diffusion.flow import add_noise, velocity, x0_from_velocity
from distill_pl.diffusion.losses import sample_training_sigma
from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.discriminator import DiscriminatorHead
from distill_pl.models.ema import EMA
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.families.registry import load_denoiser
from distill_pl.models.lora import add_lora
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.models.sharding import (
    export_student_of_run,
    gradient_sync,
    is_sharded,
    shard_stage_networks,
)
from distill_pl.models.teacher_folder import load_scheduler, scheduler_shift
from distill_pl.stages.batch import batch_conditioning, batch_pixels, check_precomputed_latents, clip_latent_shape, clip_latents
from distill_pl.stages.nonfinite import (  # noqa: F401 (NonFiniteTrainingError: raised by the policy)
    NonFinitePolicy,
    NonFiniteTrainingError,
    check_finite,
    gradient_norm,
    strategy_of,
)
from distill_pl.stages.randomness import randn, step_generator
from distill_pl.stages.student_init import load_student_weights

#: checkpoint key of the DMD2 bookkeeping that is not a tensor of a network
STATE_KEY = "dmd2"
#: frozen submodules rebuilt from their folders, never stored in checkpoints
FROZEN_PREFIXES = ("teacher.", "autoencoder.")


class DMD2Module(L.LightningModule):
    """DMD2 step distillation (manual optimization, one optimizer step per training step).

    Args:
        teacher: local teacher folder with ``transformer/`` (diffusers Wan transformer) and
            ``scheduler/`` (its flow scheduler; the timestep shift is read from it).
        init_from: student initialisation: a KD (or DMD2) Lightning checkpoint, or a
            diffusers folder; None = a copy of the teacher. Not ``--ckpt_path``, which only
            resumes a DMD2 run.
        init_from_ema: take the checkpoint's EMA weights (``student_ema.module.*``) when present.
        vae_path, vae_dtype: local video VAE folder (None: pixel space) and its dtype.
        teacher_dtype: parameter dtype of the frozen teacher (e.g. "bfloat16" to save memory).
        guidance: teacher CFG weight ``w`` in the common form ``u + w (c - u)``
            (the recipe's guidance 5 in the form ``c + g (c - u)`` is ``w = 6``).
        student_update_freq: steps per cycle: ``freq - 1`` critic steps, then 1 student step.
        t_min, t_max: ``t ~ U[t_min, t_max]``, then the teacher's shift, gives ``sigma``.
        gan_weight: weight of the generator's GAN loss (``L_G = L_DMD + gan_weight * L_GAN``).
        critic_gan_weight: weight of the discriminator loss in the critic loss
            (``fake-score FM loss + critic_gan_weight * L_D``; DESIGN.md: 1).
        feature_block: block whose hidden states the discriminator sees (None: the middle
            block, ``num_blocks // 2``).
        discriminator_on: take those features from ``"fake_score"`` (shared backbone; the
            discriminator loss also trains the fake score's first blocks) or ``"teacher"``.
        discriminator_hidden: channels of the discriminator head.
        student_lr, fake_score_lr, discriminator_lr, betas, weight_decay: AdamW settings;
            fake score and discriminator are two parameter groups of one critic optimizer.
        student_grad_clip, critic_grad_clip: max total gradient norm per optimizer (None: no
            clipping; the norms are logged either way).
        ema_decay: EMA of the student (``student_ema``), updated after each student step;
            None: no EMA.
        max_nonfinite_steps: stop after this many consecutive skipped (non-finite) updates.
        accumulate_micro_batches: micro-batches per optimizer step: each loaded batch (the data
            batch size, per device) is split into this many, of sizes that differ by at most one.
        gradient_checkpointing: recompute blocks in backward (student and fake score).
        fake_score_lora_rank: None: the fake score is a full trainable copy of the teacher.
            An int ``r``: the fake score is the teacher (frozen, in ``teacher_dtype``) with
            rank-``r`` float32 LoRA adapters (peft; ``distill_pl.models.lora``), and only the
            adapters (+ the discriminator head) are trained by the critic optimizer.
        fake_score_lora_alpha: LoRA scale ``alpha / r`` (None: ``alpha = r``, scale 1).
        fake_score_lora_targets: Linear layers given adapters, matched as suffixes of module
            paths (None: q, k, v, out of both attentions and the two FFN linears of every block).
        denoiser_options: the adapter's own options for every network loaded from the teacher
            folder (e.g. a ControlNet's ``control_scale``, ``freeze_control_branch``).
        export_dir: if set, the student (its EMA when enabled) is written there at the end of
            fit as a one-step folder: ``transformer/`` + flow-match Euler ``scheduler/``.
        seed: seeds the discriminator head's initialisation and the step-keyed draws
            (student noise, t, fresh noise) of every step.
    """

    def __init__(
        self,
        teacher: str,
        init_from: str | None = None,
        init_from_ema: bool = True,
        vae_path: str | None = None,
        vae_dtype: str = "float32",
        teacher_dtype: str = "float32",
        guidance: float = 6.0,
        student_update_freq: int = 5,
        t_min: float = 0.02,
        t_max: float = 0.98,
        gan_weight: float = 1e-3,
        critic_gan_weight: float = 1.0,
        feature_block: int | None = None,
        discriminator_on: Literal["fake_score", "teacher"] = "fake_score",
        discriminator_hidden: int = 256,
        student_lr: float = 5e-7,
        fake_score_lr: float = 5e-7,
        discriminator_lr: float = 5e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        student_grad_clip: float | None = 10.0,
        critic_grad_clip: float | None = None,
        ema_decay: float | None = None,
        max_nonfinite_steps: int = 20,
        accumulate_micro_batches: int = 1,
        gradient_checkpointing: bool = False,
        fake_score_lora_rank: int | None = None,
        fake_score_lora_alpha: float | None = None,
        fake_score_lora_targets: list[str] | None = None,
        export_dir: str | None = None,
        seed: int = 0,
        denoiser_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if student_update_freq < 2:
            raise ValueError(f"student_update_freq must be >= 2 (critic steps + 1), got {student_update_freq}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if discriminator_on not in ("fake_score", "teacher"):
            raise ValueError(f"discriminator_on must be 'fake_score' or 'teacher', got {discriminator_on!r}")
        if accumulate_micro_batches < 1:
            raise ValueError(f"accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")

        self.shift = scheduler_shift(load_scheduler(teacher))
        options = denoiser_options or {}
        self.fake_score = load_denoiser(teacher, gradient_checkpointing=gradient_checkpointing, **options)
        self.student = copy.deepcopy(self.fake_score)
        if teacher_dtype == "float32":
            self.teacher = copy.deepcopy(self.fake_score)
        else:
            self.teacher = load_denoiser(teacher, dtype=teacher_dtype, **options)
        self.teacher.set_gradient_checkpointing(False)
        self.teacher.eval().requires_grad_(False)
        if fake_score_lora_rank is not None:  # frozen base in the teacher's dtype + LoRA adapters
            if teacher_dtype != "float32":
                self.fake_score = copy.deepcopy(self.teacher).train()
                self.fake_score.set_gradient_checkpointing(gradient_checkpointing)
            add_lora(self.fake_score, fake_score_lora_rank, fake_score_lora_alpha,
                     fake_score_lora_targets, seed=seed)
        if init_from is not None:
            source = load_student_weights(self.student, init_from, use_ema=init_from_ema)
            rank_zero_info(f"DMD2 student initialised from {source}")
        else:
            rank_zero_info("DMD2 student initialised from the teacher (no init_from given)")

        blocks = self.teacher.num_blocks
        self.feature_block = blocks // 2 if feature_block is None else feature_block
        if not 0 <= self.feature_block < blocks:
            raise ValueError(f"feature_block={feature_block}: valid blocks are 0..{blocks - 1}")
        with torch.random.fork_rng(devices=[]):  # the head's init depends on `seed` only
            torch.manual_seed(seed)
            self.discriminator = DiscriminatorHead(self.teacher.feature_dim, discriminator_hidden)
        self.student_ema = EMA(self.student, ema_decay) if ema_decay is not None else None
        self.autoencoder = build_autoencoder(vae_path, vae_dtype)
        self.negative_prompt = NegativePrompt()
        self.nonfinite = NonFinitePolicy("DMD2", max_nonfinite_steps)
        self.step_metrics: dict[str, float] = {}

    # --- sharding (FSDP2) -------------------------------------------------------------------
    #: left out of checkpoints (also of distributed ones, see distill_pl.strategies)
    frozen_prefixes = FROZEN_PREFIXES

    def configure_model(self) -> None:
        """Under FSDP2 (:class:`distill_pl.strategies.FSDP2Strategy`): shard student, its EMA
        (same layout: the EMA update is shard by shard), fake score and the frozen teacher per
        transformer block, the discriminator head whole; ``reshard_after_forward=True`` keeps
        the critic/student optimizer toggling correct. bf16 compute (fp32 master shards and
        gradient reduction) when the trainer's precision is ``bf16-mixed``. Gradient
        accumulation skips the reduce-scatter of all but the last micro-batch."""
        ema = self.student_ema.module if self.student_ema is not None else None
        shard_stage_networks(self, (self.teacher, self.fake_score, self.student, ema), (self.discriminator,))

    # --- modes and conditioning ---------------------------------------------------------
    def train(self, mode: bool = True) -> "DMD2Module":
        """The teacher stays in eval mode whatever the rest does."""
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        self.negative_prompt.set_from(getattr(self.trainer, "datamodule", None))
        check_precomputed_latents(getattr(self.trainer, "datamodule", None), self.hparams.vae_path)
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"DMD2 does not support precision={precision!r} (fp16 needs a gradient scaler, "
                "which cannot skip non-finite steps the way this module does); use 32-true or bf16-mixed"
            )
        every = self.trainer.log_every_n_steps
        if every % self.hparams.student_update_freq == 0:
            rank_zero_warn(
                f"log_every_n_steps={every} is a multiple of student_update_freq="
                f"{self.hparams.student_update_freq}: only one phase's metrics would be logged; "
                "use 1 or a number coprime to it"
            )

    def set_negative_prompt(self, embeds: Tensor, mask: Tensor) -> None:
        """The [1, L, D] embedding (+ [1, L] mask) of the unconditional CFG branch."""
        self.negative_prompt.set(embeds, mask)

    def null_conditioning(self, cond: Conditioning) -> Conditioning:
        return self.negative_prompt.conditioning(cond)

    @torch.no_grad()
    def conditioning(self, batch: dict) -> Conditioning:
        """Text (+ mask) of the batch, and its control encoded like the clips; a denoiser
        without control channels (e.g. Wan2.1 T2V) gets no control."""
        return batch_conditioning(batch, self.autoencoder, self.teacher)

    def latent_shape(self, video: Tensor) -> tuple[int, ...]:
        """Shape of the latents of ``video`` [B, 3, T, H, W] (without encoding it)."""
        b, _, t, h, w = video.shape
        ae = self.autoencoder
        frames = 1 + (t - 1) // ae.temporal_compression
        return b, self.student.latent_channels, frames, h // ae.spatial_compression, w // ae.spatial_compression

    def generate(self, eps: Tensor, cond: Conditioning) -> Tensor:
        """Student one-step sample ``x_g = eps - S(eps, 1, c)`` (gradients follow the caller's mode)."""
        return one_step_sample(lambda x, s: self.student(x, s, cond), eps)

    # --- losses ----------------------------------------------------------------------------
    def _features_for_discriminator(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> tuple[Tensor | None, Tensor]:
        """(velocity of the fake score or None, block features) for the discriminator."""
        k = self.feature_block
        if self.hparams.discriminator_on == "fake_score":
            return self.fake_score(x, sigma, cond, feature_block=k)
        return None, self.teacher(x, sigma, cond, feature_block=k)[1]

    def critic_loss(
        self, x_g: Tensor, x_real: Tensor, sigma: Tensor, noise: Tensor, noise_real: Tensor, cond: Conditioning
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Fake-score flow-matching loss on detached student samples + discriminator loss.

        ``x_t = add_noise(x_g, noise, sigma)``; the real clip is noised to the same sigma
        with its own noise. Fake and real go through the feature network in one batch.
        """
        x_g = x_g.detach()
        b = x_g.shape[0]
        x_t = add_noise(x_g, noise, sigma)
        x_t_real = add_noise(x_real, noise_real, sigma)
        both = Conditioning.cat([cond, cond])
        if self.hparams.discriminator_on == "fake_score":
            v, features = self.fake_score(
                torch.cat([x_t, x_t_real]), sigma.repeat(2), both, feature_block=self.feature_block
            )
            v_fake = v[:b]
        else:
            v_fake = self.fake_score(x_t, sigma, cond)
            with torch.no_grad():
                _, features = self.teacher(
                    torch.cat([x_t, x_t_real]), sigma.repeat(2), both, feature_block=self.feature_block
                )
        fake_score_loss = torch.mean((v_fake.float() - velocity(x_g, noise).float()) ** 2)
        logits = self.discriminator(features)
        logits_fake, logits_real = logits[:b], logits[b:]
        discriminator_loss = gan_discriminator_loss(logits_real, logits_fake)
        loss = fake_score_loss + self.hparams.critic_gan_weight * discriminator_loss
        accuracy = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        logs = {
            "critic_loss": loss,
            "fake_score_loss": fake_score_loss,
            "discriminator_loss": discriminator_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "discriminator_accuracy": accuracy,
        }
        return loss, logs

    def generator_loss(
        self, x_g: Tensor, sigma: Tensor, noise: Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_G = L_DMD + gan_weight * softplus(-D(features of x_t)))``.

        ``x0_real``: teacher with CFG ``w`` at ``(x_t, sigma)``; ``x0_fake``: fake score
        without CFG; both without gradient. The GAN term's gradient flows through the
        (not updated) feature network and head into ``x_g``.
        """
        x_t = add_noise(x_g, noise, sigma)
        x_t_const = x_t.detach()
        with torch.no_grad():
            teacher = velocity_fn(self.teacher, cond, uncond, self.hparams.guidance)
            x0_real = x0_from_velocity(x_t_const, sigma, teacher(x_t_const, sigma))
        use_gan = self.hparams.gan_weight != 0
        if use_gan:
            v_fake, features = self._features_for_discriminator(x_t, sigma, cond)
        if not use_gan or v_fake is None:
            with torch.no_grad():
                v_fake = self.fake_score(x_t_const, sigma, cond)
        x0_fake = x0_from_velocity(x_t_const, sigma, v_fake.detach())
        del v_fake  # frees the part of the fake score's graph the GAN term does not need

        normaliser = dmd_normaliser(x_g, x0_real)
        loss_dmd = dmd_loss(x_g, dmd_gradient(x0_fake, x0_real, normaliser))
        logs = {"dmd_loss": loss_dmd, "dmd_normaliser": normaliser.mean()}
        loss = loss_dmd
        if use_gan:
            logits_fake = self.discriminator(features)
            loss_gan = gan_generator_loss(logits_fake)
            loss = loss + self.hparams.gan_weight * loss_gan
            logs.update(gan_loss=loss_gan, generator_logits_fake=logits_fake.mean())
        logs["generator_loss"] = loss
        return loss, logs

    # --- training --------------------------------------------------------------------------
    def phase(self, step: int | None = None) -> int:
        """``step % student_update_freq`` (default: the current global step)."""
        return (self.global_step if step is None else step) % self.hparams.student_update_freq

    def is_generator_phase(self, step: int | None = None) -> bool:
        return self.phase(step) == self.hparams.student_update_freq - 1

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = self.global_step
        critic_opt, student_opt = self.optimizers()
        generator_phase = self.is_generator_phase(step)
        if generator_phase:
            optimizer, groups, max_norm = student_opt, {"student": self.student}, self.hparams.student_grad_clip
        else:
            groups = {"fake_score": self.fake_score, "discriminator": self.discriminator}
            optimizer, max_norm = critic_opt, self.hparams.critic_grad_clip
        draws = self.step_draws(batch, step)
        size = len(batch["text_embeds"])
        n = min(self.hparams.accumulate_micro_batches, size)
        bounds = [size * i // n for i in range(n + 1)]
        logs: dict[str, Tensor] = {}
        finite = True
        with self.toggled_optimizer(optimizer):
            optimizer.zero_grad(set_to_none=True)
            for lo, hi in zip(bounds, bounds[1:]):
                rows = slice(lo, hi)
                with self._gradient_sync(last=hi == size):
                    micro = {k: v[rows] for k, v in batch.items()}
                    loss, micro_logs = self.micro_batch_loss(generator_phase, micro, *(d[rows] for d in draws))
                    weight = (hi - lo) / size
                    for k, v in micro_logs.items():
                        logs[k] = logs.get(k, 0.0) + weight * v.detach()
                    # decided jointly by all ranks, before backward
                    finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
                    if not finite:
                        break
                    self.manual_backward(weight * loss)
            applied, norms = self._update(optimizer, finite, groups, max_norm)
        if applied and generator_phase and self.student_ema is not None:
            self.student_ema.update(self.student)

        self._count_nonfinite(applied, step)
        self._log_step(step, logs, norms, applied, size)

    def step_draws(self, batch: dict, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(eps, sigma, noise, noise_real) of this rank's samples at ``step``: latents
        [B, C, T', H', W'] and sigma [B], each sample's from its own step generator (see the
        module docstring)."""
        like = batch["text_embeds"]
        b, *shape = clip_latent_shape(batch, self.autoencoder, self.student.latent_channels)
        rank, replicas = data_parallel_layout(self.trainer)
        h = self.hparams
        draws = []
        for j in range(b):
            g = step_generator(h.seed, step, stream=rank + replicas * j)
            eps = randn((1, *shape), g, like)
            sigma = sample_training_sigma(1, self.shift, h.t_min, h.t_max, generator=g).to(like)
            draws.append((eps, sigma, randn((1, *shape), g, like), randn((1, *shape), g, like)))
        return tuple(torch.cat(d) for d in zip(*draws))

    def micro_batch_loss(
        self, generator_phase: bool, batch: dict, eps: Tensor, sigma: Tensor, noise: Tensor, noise_real: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The phase's loss (and logs) on one micro-batch, given its draws."""
        cond = self.conditioning(batch)
        if generator_phase:
            x_g = self.generate(eps, cond)
            return self.generator_loss(x_g, sigma, noise, cond, self.null_conditioning(cond))
        with torch.no_grad():
            x_g = self.generate(eps, cond)
            x_real = clip_latents(batch, self.autoencoder).to(eps)
        return self.critic_loss(x_g, x_real, sigma, noise, noise_real, cond)

    def _gradient_sync(self, last: bool):
        """Context of a micro-batch: DDP all-reduces (FSDP2 reduce-scatters) gradients only
        in the last one's backward."""
        strategy = self.trainer.strategy
        if is_sharded(self.student):
            return gradient_sync((self.student, self.fake_score, self.discriminator), enabled=last)
        if last or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _log_step(self, step: int, logs: dict, norms: dict, applied: bool, batch_size: int) -> None:
        """Log this step's metrics; ``self.step_metrics`` keeps them as floats.

        ``train/phase``, ``train/update_skipped`` and ``train/nonfinite_steps`` exist in every
        step and go through ``self.log``. The phase's own metrics (losses, logits, normaliser,
        gradient norms) go to the loggers directly, at Lightning's logging steps: through
        ``self.log`` Lightning would re-log a key's last value at every later step of the
        epoch, so a critic loss would appear again at student steps. They still reach
        ``callback_metrics`` and the progress bar (``logger=False``).
        """
        phase_metrics = {f"train/{k}": v.detach().float() for k, v in logs.items()}
        phase_metrics.update({f"train/grad_norm_{k}": v for k, v in norms.items()})
        common = {
            "train/phase": float(self.phase(step)),
            "train/update_skipped": float(not applied),
            "train/nonfinite_steps": float(self.nonfinite_total),
        }
        self.step_metrics = {k: float(v) for k, v in {**phase_metrics, **common}.items()}
        self.log_dict(common, on_step=True, on_epoch=False, batch_size=batch_size)
        shown = {"train/critic_loss", "train/generator_loss"}
        for key, value in phase_metrics.items():
            self.log(key, value, on_step=True, on_epoch=False, logger=False, prog_bar=key in shown,
                     batch_size=batch_size)
        if self.loggers and (step + 1) % self.trainer.log_every_n_steps == 0:
            values = {k: self.step_metrics[k] for k in phase_metrics}
            for logger in self.loggers:
                logger.log_metrics(values, step=step)

    def _update(
        self, optimizer, finite: bool, groups: dict[str, torch.nn.Module], max_norm: float | None
    ) -> tuple[bool, dict[str, Tensor]]:
        """Gradient norms (+ clipping) of the accumulated gradients, one optimizer step.
        Returns (applied, norms).

        A non-finite loss (``finite`` False) or gradient skips the update: every gradient is
        set to None before ``optimizer.step()``, which then changes nothing but still counts
        as Lightning's step.
        """
        norms: dict[str, Tensor] = {}
        if finite:
            grads = {
                name: [p.grad for p in module.parameters() if p.grad is not None]
                for name, module in groups.items()
            }
            # sharded (DTensor) gradients: the norm of the full gradient, the same on every rank
            norms = {name: gradient_norm(gs) for name, gs in grads.items()}
            total = torch.stack(list(norms.values())).square().sum().sqrt()
            finite = bool(torch.isfinite(total))  # gradients are all-reduced: same on every rank
            if finite and max_norm is not None:
                params = [p for module in groups.values() for p in module.parameters() if p.grad is not None]
                with implicit_replication():  # a plain total norm may scale DTensor gradients
                    clip_grads_with_norm_(params, max_norm, total)
        if not finite:
            norms = {}
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients until this optimizer's next step
        return finite, norms

    def _count_nonfinite(self, applied: bool, step: int) -> None:
        what = "student" if self.is_generator_phase(step) else "critic"
        self.nonfinite.record(applied, step, f"{what} phase")

    @property
    def nonfinite_total(self) -> int:
        """Skipped (non-finite) updates of the run so far."""
        return self.nonfinite.total

    @property
    def nonfinite_streak(self) -> int:
        """Skipped updates in a row up to the last step."""
        return self.nonfinite.streak

    def configure_optimizers(self):
        h = self.hparams
        critic = torch.optim.AdamW(
            [
                {"params": [p for p in self.fake_score.parameters() if p.requires_grad],  # LoRA: adapters only
                 "lr": h.fake_score_lr, "name": "fake_score"},
                {"params": list(self.discriminator.parameters()), "lr": h.discriminator_lr, "name": "discriminator"},
            ],
            betas=tuple(h.betas),
            weight_decay=h.weight_decay,
        )
        student = torch.optim.AdamW(
            [{"params": [p for p in self.student.parameters() if p.requires_grad],  # e.g. a frozen control branch
              "lr": h.student_lr, "name": "student"}],
            betas=tuple(h.betas),
            weight_decay=h.weight_decay,
        )
        return [critic, student]

    # --- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen teacher and VAE (reloaded from their folders); keep the skip counters.
        Non-finite weights are refused (:func:`~distill_pl.stages.nonfinite.check_finite`)."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        check_finite(state, f"a DMD2 checkpoint at step {self.global_step}", strategy_of(self))
        checkpoint[STATE_KEY] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Accept only DMD2 checkpoints; put the current teacher's and VAE's weights back in.

        Lightning calls this before it loads the state dict, so a KD checkpoint passed as
        ``--ckpt_path`` fails here with a message instead of a state-dict mismatch.
        """
        state = checkpoint.get("state_dict", {})
        if not any(k.startswith("fake_score.") for k in state):
            hparams = checkpoint.get("hyper_parameters", {})
            written_by = hparams.get("_class_path") if isinstance(hparams, dict) else None
            kind = f"written by {written_by}" if written_by else "without fake_score.* weights"
            raise ValueError(
                f"this checkpoint is not a DMD2 checkpoint ({kind}). --ckpt_path only resumes a "
                "DMD2 run; to start DMD2 from a KD student pass its checkpoint as "
                "--model.init_from <path> (EMA weights by default, --model.init_from_ema false "
                "for the raw ones) and no --ckpt_path."
            )
        for prefix in FROZEN_PREFIXES:
            for key, value in getattr(self, prefix[:-1]).state_dict().items():
                state[prefix + key] = value
        self.nonfinite.load_state_dict(checkpoint.get(STATE_KEY, {}))

    # --- monitoring --------------------------------------------------------------------------
    @torch.no_grad()
    def student_samples(self, batch: dict, seed: int) -> Tensor:
        """The student's one-step samples of ``batch`` from noise seeded by ``seed``, decoded:
        pixels [B, 3, T, H, W] (for :class:`~distill_pl.callbacks.collapse.CollapseMonitor`)."""
        like = batch["text_embeds"]
        g = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(self.latent_shape(batch["video"]), generator=g).to(like)
        return self.autoencoder.decode(self.generate(eps, self.conditioning(batch)))

    @torch.no_grad()
    def grid_rows(self, batch: dict, seed: int) -> dict[str, Tensor]:
        """Rows of the monitoring grid (see callbacks.FrameGridLogger), from the same noise:
        the student's 1-step sample; the teacher's 1-step sample ``eps - v(eps, 1)`` with the
        DMD guidance ``w`` (the clean estimate the DMD gradient pulls toward at sigma = 1);
        the control input (labelled unused for a model without control); the real clip."""
        cond = self.conditioning(batch)
        like = batch["text_embeds"]
        g = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(clip_latent_shape(batch, self.autoencoder, self.student.latent_channels), generator=g).to(like)
        w = self.hparams.guidance
        teacher = velocity_fn(self.teacher, cond, self.null_conditioning(cond), w)
        return {
            "student 1-step": self.autoencoder.decode(self.generate(eps, cond)),
            f"teacher 1-step w={w:g}": self.autoencoder.decode(one_step_sample(teacher, eps)),
            "control" if self.teacher.control_channels else "control (unused)": batch_pixels(batch, "control", self.autoencoder),
            "ground truth": batch_pixels(batch, "video", self.autoencoder),
        }

    # --- export ------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if self.hparams.export_dir:
            student = self.student_ema.module if self.student_ema is not None else self.student
            export_student_of_run(self.trainer, student, self.hparams.export_dir, self.shift, self.hparams.teacher)


def dmd2_losses(networks: dict[str, torch.nn.Module], hparams: dict, feature_block: int) -> SimpleNamespace:
    """An object on which :class:`DMD2Module`'s own ``generate``, ``critic_loss`` and
    ``generator_loss`` run with bare networks (``student``, ``teacher``, ``fake_score``,
    ``discriminator``) and the loss hyperparameters (``discriminator_on``,
    ``critic_gan_weight``, ``guidance``, ``gan_weight``): for tools that measure a DMD2 step
    without a Trainer (the memory estimate, the GPU benchmark)."""
    losses = SimpleNamespace(**networks, hparams=AttributeDict(hparams), feature_block=feature_block)
    for name in ("generate", "_features_for_discriminator", "critic_loss", "generator_loss"):
        setattr(losses, name, functools.partial(getattr(DMD2Module, name), losses))
    return losses
