"""DMD2: distribution matching distillation of a CFG teacher into a one- or few-step student.

The loss math (the student's trained step, the critic and generator losses, the draws) is
:class:`~distill_pl.methods.dmd2.DMD2Objective` and the networks are built by
:class:`~distill_pl.methods.dmd2.DMD2Roles` from this module's settings (loaded from the
teacher folder); this module keeps them as its own attributes and builds its
optimizers and the alternation (which phase steps which optimizer), the grid and the
export; the training loop itself (micro-batches, gradient sync, the non-finite policy,
clipping, logging, checkpoint hooks) is the one of every stage,
:class:`~distill_pl.training.base.StageModule`. Four networks:

- ``student``: the generator, one step ``x_g = eps - S(eps, 1, c)`` or K steps at the noise
  levels ``student_sigmas`` with re-noising; initialised from a KD checkpoint
  (``init_from``, EMA weights by default) or, without one, from the teacher (optionally
  only LoRA adapters on those weights, frozen: ``student_lora_rank``).
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
noise, ``t``, fresh noises, (K > 1) trained step and re-noising noises and (Decoupled DMD
with its own schedule) the terms' noise levels and noises come from
``step_generator(seed, global_step, stream=that index)``
(:meth:`~distill_pl.methods.dmd2.DMD2Objective.draw_batch`, one generator per sample), so they depend neither on the
number of devices nor on the micro-batches (with ``data.rank_split: litdata`` the global
batches themselves depend on the number of devices).

Non-finite losses or gradients: the shared policy of every stage
(:mod:`distill_pl.training.nonfinite`). The update is skipped and counted. A skipped step still
calls ``optimizer.step()`` (so Lightning's step counter, and with it the phase, the data
position and the step-keyed randomness, stay in lockstep) but with every gradient set to
``None``, so nothing moves. ``max_nonfinite_steps`` consecutive skips stop the run with an
error, before any NaN reaches the weights or a checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from distill_pl.data.resumable import data_parallel_layout
from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.diffusion.student_steps import resolve_phase_boundaries, student_noise_levels
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.context_parallel import stage_context_parallel
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.guidance import check_guidance_2, uses_cfg, velocity_fn
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.models.sharding import is_sharded, shard_stage_networks
from distill_pl.export.model_folders import export_student_of_run, load_scheduler, scheduler_shift
from distill_pl.methods.dmd2 import (
    DMD2Draws,
    DMD2Objective,
    DMD2Roles,
    FakeScoreExperts,
    TrainedStepInput,
    check_trained_step_input,
    dmd2_objective,
)
from distill_pl.methods.roles import folder_denoisers
from distill_pl.training.batch import (
    batch_conditioning,
    batch_pixels,
    check_precomputed_latents,
    clip_latent_shape,
    clip_latents,
    give_first_frames,
)
from distill_pl.training.batch import conditional_frame_probabilities as resolve_conditional_frames
from distill_pl.training.base import StageModule
from distill_pl.training.nonfinite import NonFinitePolicy, NonFiniteTrainingError  # noqa: F401 (raised by the policy)
from distill_pl.util.randomness import step_generator
from distill_pl.models.student_init import load_student_weights

#: checkpoint key of the DMD2 bookkeeping that is not a tensor of a network
STATE_KEY = "dmd2"
#: frozen submodules rebuilt from their folders, never stored in checkpoints
FROZEN_PREFIXES = ("teacher.", "autoencoder.")
#: DMD2Module attributes the objective holds, by the objective's field name for each
OBJECTIVE_ATTRIBUTES = {"student": "student", "teacher": "teacher", "fake_score": "fake_score",
                        "discriminator": "discriminator", "feature_block": "feature_block", "shift": "shift",
                        "student_levels": "student_sigmas", "phase_boundaries": "phase_boundaries"}


class DMD2Module(StageModule):
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
        guidance_2: a two-expert teacher's (Wan 2.2 A14B) CFG weight at the levels its
            low-noise expert denoises, in the DMD term (the pipelines' ``guidance_scale_2``);
            None: ``guidance`` everywhere. ValueError for a teacher of one network and with
            ``decoupled_dmd``.
        student_update_freq: steps per cycle: ``freq - 1`` critic steps, then 1 student step.
        t_min, t_max: ``t ~ U[t_min, t_max]``, then the teacher's shift, gives ``sigma``.
        gan_weight: weight of the generator's GAN loss (``L_G = L_DMD + gan_weight * L_GAN``).
        critic_gan_weight: weight of the discriminator loss in the critic loss
            (``fake-score FM loss + critic_gan_weight * L_D``; default 1).
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
        fake_score_experts: with a two-expert teacher (Wan 2.2 A14B), ``"per_expert"`` (the
            default): the fake score is a two-expert copy of the teacher, one fake score per
            expert, each trained on the levels its expert owns (as Phased DMD's authors do:
            one fake score per phase); ``"shared"``: ONE network, a copy of the teacher's
            low-noise expert, serves every level (half the fake score's weights, gradients
            and AdamW state; why that expert: :func:`~distill_pl.methods.dmd2.shared_fake_score`).
            ``"shared"`` with a teacher of one network is a one-line ValueError.
        fake_score_lora_alpha: LoRA scale ``alpha / r`` (None: ``alpha = r``, scale 1).
        fake_score_lora_targets: Linear layers given adapters, matched as suffixes of module
            paths (None: q, k, v, out of both attentions and the two FFN linears of every block).
        student_lora_rank, student_lora_alpha, student_lora_targets: the same for the
            student: None: a full float32 student; an int ``r``: the student's initial weights
            (``init_from``, else the teacher's) frozen in ``teacher_dtype`` with rank-``r``
            float32 adapters, which alone the student optimizer trains. Checkpoints hold base
            and adapters; the export merges them (``W + (alpha / r) B A``) into full float32
            weights, so the exported folder is a plain diffusers model.
        student_sigmas: the student's noise levels, decreasing from 1.0 (``[1.0]``: one step;
            e.g. ``[1.0, 0.75, 0.5, 0.25]``: four steps with re-noising in between).
        student_sigmas_shifted: False: the teacher's timestep shift is applied to
            ``student_sigmas`` (as a diffusers flow scheduler does to custom sigmas); True:
            they are the noise levels already.
        trained_step_input: for K > 1, the input of each sample's trained (random) step:
            ``"backward_simulation"``: the student's own chain run without gradient to that
            step; ``"noised_real"``: the real clip noised to that step's level.
        phased_dmd: Phased DMD: the noise range split into phases trained one after the other,
            each on its own noise interval (see :mod:`distill_pl.methods.dmd2`); by default
            step k is trained in phase k only, on the subinterval below its level.
        phase_boundaries: Phased DMD's phase boundaries: None (default): every student level,
            one step per phase; a list of values of ``student_sigmas`` (as written there),
            decreasing, strictly inside (0, 1): the phases are the intervals between them (1
            and 0 at the ends), each training a step drawn among its steps; ``"experts"``: the
            first level a two-expert student's low-noise expert runs (two phases, each with
            the steps one expert runs). Needs ``phased_dmd``.
        phase_generator_steps: generator updates per Phased DMD phase (the last phase runs
            to the end); needed with ``phased_dmd``.
        denoiser_options: the adapter's own options for every network loaded from the teacher
            folder (e.g. a ControlNet's ``control_scale``, ``freeze_control_branch``).
        export_dir: if set, the student (its EMA when enabled) is written there at the end of
            fit: ``transformer/`` + flow-match Euler ``scheduler/`` + ``student_steps.json``
            (its noise levels).
        seed: seeds the discriminator head's initialisation and the step-keyed draws
            (student noise, t, fresh noise, trained step, re-noising noise) of every step.
        decoupled_dmd: Decoupled DMD (see :mod:`distill_pl.methods.dmd2`): the DMD gradient
            as its distribution-matching (DM) and CFG-augmentation (CA) terms, weighted by
            ``dm_weight`` and ``ca_weight`` (default 1 each: the DMD gradient). False (the
            default): the DMD gradient as one term; the other decoupled settings must be unset.
        dm_t_min, dm_t_max, ca_t_min, ca_t_max: the ``t`` range (then the shift, as for
            ``t_min`` / ``t_max``) of each term's own noise level; None: ``t_min`` / ``t_max``.
            With both ranges the shared one, both terms use the step's sigma and noise (no
            extra draws: the random stream of the coupled run).
        conditional_frame_probabilities: for a model that takes conditional frames (Cosmos
            2.5), the probabilities of giving the first 0, 1, 2, ... latent frames of each real
            clip (capped at T' - 1) to the student, teacher and fake score as conditional
            frames, drawn per sample with the step's draws; on them every network's clean
            estimate is the given latents, so the losses there are zero. None: the model's
            default (0.6 / 0.2 / 0.2 for 0 / 1 / 2; none for a model without conditional
            frames); ``[1.0]``: none.
        compile: regional compilation (``torch.compile`` of each transformer block, see
            :meth:`~distill_pl.models.denoiser.Denoiser.compile_blocks`) of the student, the
            teacher and the fake score, at the start of fit (after any sharding); the first
            steps then take the compile time.
        context_parallel: ``{ulysses: N, ring: M}``: every pass of every network is split over
            the tokens of a group of N x M processes (see
            :mod:`distill_pl.models.context_parallel`; needs the FSDP2 strategy and a family with a
            context-parallel plan; ring needs CUDA); None (default): no splitting.
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
        guidance_2: float | None = None,
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
        fake_score_experts: FakeScoreExperts = "per_expert",
        fake_score_lora_alpha: float | None = None,
        fake_score_lora_targets: list[str] | None = None,
        student_lora_rank: int | None = None,
        student_lora_alpha: float | None = None,
        student_lora_targets: list[str] | None = None,
        student_sigmas: list[float] = [1.0],
        student_sigmas_shifted: bool = False,
        trained_step_input: TrainedStepInput = "backward_simulation",
        phased_dmd: bool = False,
        phase_generator_steps: int | None = None,
        phase_boundaries: list[float] | str | None = None,
        export_dir: str | None = None,
        seed: int = 0,
        denoiser_options: dict[str, object] | None = None,
        decoupled_dmd: bool = False,
        dm_weight: float = 1.0,
        ca_weight: float = 1.0,
        dm_t_min: float | None = None,
        dm_t_max: float | None = None,
        ca_t_min: float | None = None,
        ca_t_max: float | None = None,
        compile: bool = False,
        context_parallel: dict[str, int] | None = None,
        conditional_frame_probabilities: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if student_update_freq < 2:
            raise ValueError(f"student_update_freq must be >= 2 (critic steps + 1), got {student_update_freq}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if discriminator_on not in ("fake_score", "teacher"):
            raise ValueError(f"discriminator_on must be 'fake_score' or 'teacher', got {discriminator_on!r}")
        if accumulate_micro_batches < 1:
            raise ValueError(f"accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")
        if phased_dmd and (phase_generator_steps is None or phase_generator_steps < 1):
            raise ValueError(f"phased_dmd needs phase_generator_steps >= 1, got {phase_generator_steps}")
        check_trained_step_input(trained_step_input, phased_dmd)
        if phase_boundaries is not None and not phased_dmd:
            raise ValueError("phase_boundaries is a setting of Phased DMD: set phased_dmd: true to use it")

        self.shift = scheduler_shift(load_scheduler(teacher))

        def initialise_student(student: Denoiser) -> None:
            if init_from is not None:
                source = load_student_weights(student, init_from, use_ema=init_from_ema)
                rank_zero_info(f"DMD2 student initialised from {source}")
            else:
                rank_zero_info("DMD2 student initialised from the teacher (no init_from given)")

        roles = DMD2Roles.from_settings(self.hparams, folder_denoisers(teacher, denoiser_options),
                                        initialise_student=initialise_student)
        # the networks are this module's own attributes, in this order: the checkpoints' keys
        self.fake_score = roles.fake_score
        self.student = roles.student
        self.teacher = roles.teacher
        check_guidance_2(self.teacher, guidance_2, "model.init_args.guidance_2")
        self.feature_block = roles.feature_block
        self.discriminator = roles.discriminator
        self.student_ema = roles.student_ema
        self.autoencoder = build_autoencoder(vae_path, vae_dtype)
        #: the context-parallel setting (None: off), read by the strategy and configure_model
        self.context_parallel = stage_context_parallel(context_parallel, self.student)
        self.negative_prompt = NegativePrompt()
        self.nonfinite = NonFinitePolicy("DMD2", max_nonfinite_steps)
        self.student_levels = student_noise_levels(student_sigmas, self.shift, student_sigmas_shifted)
        #: Phased DMD's phase boundaries as student levels (None: one phase per step)
        self.phase_boundaries = resolve_phase_boundaries(phase_boundaries, student_sigmas, self.student_levels,
                                                         self.student.low_noise_levels)
        if export_dir:
            self.teacher.check_student_levels(self.student_levels)
        self.conditional_frame_probabilities = resolve_conditional_frames(self.teacher, conditional_frame_probabilities)
        self.objective = self.build_objective()

    stage_name = "DMD2"
    nonfinite_key = STATE_KEY
    compiled_networks = ("student", "teacher", "fake_score")
    progress_bar_logs = ("critic_loss", "generator_loss")
    grad_clip_setting = "student_grad_clip / model.critic_grad_clip"

    @property
    def num_phases(self) -> int:
        return self.hparams.student_update_freq

    # --- sharding (FSDP2) -------------------------------------------------------------------
    #: left out of checkpoints (also of distributed ones, see distill_pl.training.strategies)
    frozen_prefixes = FROZEN_PREFIXES

    def configure_model(self) -> None:
        """Under FSDP2 (:class:`distill_pl.training.strategies.FSDP2Strategy`): shard student, its EMA
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
        super().setup(stage)  # refuses fp16
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

    def guidance_uncond(self, cond: Conditioning) -> Conditioning | None:
        """The teacher's unconditional branch: None at guidance 1 (``u + 1 (c - u) = c``, no
        unconditional pass, so no negative prompt is needed; with ``guidance_2`` unset or 1
        too), else :meth:`null_conditioning`."""
        return self.null_conditioning(cond) if uses_cfg(self.hparams.guidance, self.hparams.guidance_2) else None

    @torch.no_grad()
    def conditioning(self, batch: dict) -> Conditioning:
        """Text (+ mask) of the batch, and its control encoded like the clips; a denoiser
        without control channels (e.g. Wan2.1 T2V) gets no control."""
        return batch_conditioning(batch, self.autoencoder, self.teacher)

    def latent_shape(self, video: Tensor) -> tuple[int, ...]:
        """Shape of the latents of ``video`` [B, 3, T, H, W] (without encoding it)."""
        b, _, t, h, w = video.shape
        return b, self.student.latent_channels, *self.autoencoder.latent_grid(t, h, w)

    def build_objective(self) -> DMD2Objective:
        """The DMD2 objective over this module's networks and loss settings
        (:func:`~distill_pl.methods.dmd2.dmd2_objective`, as the memory estimate builds it;
        built once, in ``__init__``, as ``self.objective``; a plain dataclass, so the networks'
        state-dict keys stay those of the module's own attributes)."""
        return dmd2_objective(self, self.hparams, self.student_levels, self.shift,
                              self.conditional_frame_probabilities, self.phase_boundaries)

    def __setattr__(self, name: str, value) -> None:
        """Re-assigning a network or setting the objective reads (e.g. a test swapping in toy
        networks) re-points the objective at the new one."""
        super().__setattr__(name, value)
        objective = self.__dict__.get("objective")
        if objective is not None and name in OBJECTIVE_ATTRIBUTES:
            setattr(objective, OBJECTIVE_ATTRIBUTES[name], value)

    def dmd_phase(self, step: int) -> int:
        """The Phased DMD phase at training step ``step``: generator updates so far //
        ``phase_generator_steps``, at most the last phase (phases: one per step, or
        ``len(phase_boundaries) + 1``); 0 without Phased DMD."""
        h = self.hparams
        if not h.phased_dmd:
            return 0
        return min(step // h.student_update_freq // h.phase_generator_steps, len(self.objective.phase_steps) - 1)

    # --- training --------------------------------------------------------------------------
    def phase(self, step: int | None = None) -> int:
        """``step % student_update_freq`` (default: the current global step)."""
        return (self.global_step if step is None else step) % self.hparams.student_update_freq

    def is_generator_phase(self, step: int | None = None) -> bool:
        return self.phase(step) == self.hparams.student_update_freq - 1

    def phase_name(self, phase: int) -> str:
        return "student phase" if phase == self.hparams.student_update_freq - 1 else "critic phase"

    def phase_optimizer(self, phase: int) -> tuple[int, dict[str, torch.nn.Module], float | None]:
        """Critic phases: the critic optimizer (fake score + discriminator); the last phase of
        the cycle: the student optimizer."""
        if phase == self.hparams.student_update_freq - 1:
            return 1, self.phase_networks("generator"), self.hparams.student_grad_clip
        return 0, self.phase_networks("critic"), self.hparams.critic_grad_clip

    def phase_networks(self, phase: str) -> dict[str, torch.nn.Module]:
        """The networks :class:`~distill_pl.methods.dmd2.DMD2Roles` says ``phase`` ("critic",
        "generator") trains, by role name."""
        return {name: getattr(self, name) for name in DMD2Roles.phases[phase]}

    def phase_draws(self, phase: int, batch: dict, step: int) -> DMD2Draws:
        return self.step_draws(batch, step)

    def phase_loss(self, phase: int, batch: dict, draws: DMD2Draws) -> tuple[Tensor, dict[str, Tensor]]:
        return self.micro_batch_loss(phase == self.hparams.student_update_freq - 1, batch, draws)

    def after_update(self, phase: int, skipped_experts: dict[str, tuple[str, ...]]) -> None:
        """The student's EMA, after each applied student step (an expert whose own update was
        skipped keeps its average)."""
        if phase == self.hparams.student_update_freq - 1 and self.student_ema is not None:
            self.student_ema.update(self.student, skip=skipped_experts.get("student", ()))

    def sharded_networks(self) -> tuple[torch.nn.Module, ...]:
        if is_sharded(self.student):
            return (self.student, self.fake_score, self.discriminator)
        return ()

    def step_draws(self, batch: dict, step: int) -> DMD2Draws:
        """The draws (:class:`~distill_pl.methods.dmd2.DMD2Draws`) of this rank's samples at
        ``step``, each sample's from its own step generator (see the module docstring)."""
        like = batch["text_embeds"]
        b, *shape = clip_latent_shape(batch, self.autoencoder, self.student.latent_channels)
        rank, replicas = data_parallel_layout(self.trainer)
        generators = [step_generator(self.hparams.seed, step, stream=rank + replicas * j) for j in range(b)]
        return self.objective.draw_batch(generators, (b, *shape), like, self.dmd_phase(step))

    def micro_batch_loss(
        self, generator_phase: bool, batch: dict, draws: DMD2Draws
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The phase's loss (and logs) on one micro-batch, given its draws."""
        cond = self.conditioning(batch)
        objective = self.objective
        needs_real = (not generator_phase or draws.num_cond_frames is not None
                      or (objective.num_steps > 1 and objective.trained_step_input == "noised_real"))
        x_real = None
        if needs_real:
            with torch.no_grad():
                x_real = clip_latents(batch, self.autoencoder).to(draws.eps)
        if draws.num_cond_frames is not None:  # the clip's first latent frames, given
            cond = give_first_frames(cond, x_real, draws.num_cond_frames)
        if generator_phase:
            out = objective.trained_step(draws, cond, x_real)
            return objective.generator_loss(out.sample, draws.sigma, draws.noise, cond, self.guidance_uncond(cond),
                                            level=out.level, x0=out.x0, sigma_dm=draws.sigma_dm,
                                            noise_dm=draws.noise_dm, sigma_ca=draws.sigma_ca, noise_ca=draws.noise_ca)
        with torch.no_grad():
            out = objective.trained_step(draws, cond, x_real)
        return objective.critic_loss(out.sample, x_real, draws.sigma, draws.noise, draws.noise_real, cond,
                                     level=out.level)

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
    def check_checkpoint(self, checkpoint: dict) -> None:
        """Accept only DMD2 checkpoints (the frozen teacher's and VAE's weights are then put
        back in by :meth:`~distill_pl.training.base.StageModule.on_load_checkpoint`).

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

    # --- monitoring --------------------------------------------------------------------------
    @torch.no_grad()
    def student_samples(self, batch: dict, seed: int) -> Tensor:
        """The student's K-step samples of ``batch`` from noise (and re-noising noise) seeded by
        ``seed``, decoded: pixels [B, 3, T, H, W] (for
        :class:`~distill_pl.callbacks.collapse.CollapseMonitor`)."""
        like = batch["text_embeds"]
        g = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(clip_latent_shape(batch, self.autoencoder, self.student.latent_channels), generator=g).to(like)
        return self.autoencoder.decode(self.objective.generate(eps, self.conditioning(batch), generator=g))

    @torch.no_grad()
    def grid_rows(self, batch: dict, seed: int) -> dict[str, Tensor]:
        """Rows of the monitoring grid (see callbacks.FrameGridLogger), from the same noise:
        the student's K-step sample (re-noising noise from ``seed``); the teacher's 1-step
        sample ``eps - v(eps, 1)`` with the DMD guidance ``w`` (the clean estimate the DMD
        gradient pulls toward at sigma = 1);
        the control input (labelled unused for a model without control); the real clip."""
        cond = self.conditioning(batch)
        like = batch["text_embeds"]
        g = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(clip_latent_shape(batch, self.autoencoder, self.student.latent_channels), generator=g).to(like)
        w = self.hparams.guidance
        teacher = velocity_fn(self.teacher, cond, self.guidance_uncond(cond), w, self.hparams.guidance_2)
        steps = len(self.student_levels)
        return {
            f"student {steps}-step": self.autoencoder.decode(self.objective.generate(eps, cond, generator=g)),
            f"teacher 1-step w={w:g}": self.autoencoder.decode(one_step_sample(teacher, eps)),
            "control" if self.teacher.control_channels else "control (unused)": batch_pixels(batch, "control", self.autoencoder),
            "ground truth": batch_pixels(batch, "video", self.autoencoder),
        }

    # --- export ------------------------------------------------------------------------------
    def export(self, export_dir: str) -> None:
        student = self.student_ema.module if self.student_ema is not None else self.student
        export_student_of_run(self.trainer, student, export_dir, self.shift, self.student_levels,
                              self.hparams.teacher)
