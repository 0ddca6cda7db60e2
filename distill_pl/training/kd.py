"""Knowledge distillation (KD): regress the student's output on the teacher's N-step output.

For each stored pair (noise ``eps``, text, control, teacher output ``x_teacher``, see
:mod:`distill_pl.data.pairs`) a one-step student generates from pure noise,
``x_g = eps - S(eps, 1, c)``, and the loss is ``L_KD = mean((x_g - x_teacher)^2)``; a
K-step student (``student_sigmas``) regresses each step on the teacher's trajectory stored
with the pair. The loss is :class:`~distill_pl.methods.kd.KDObjective` and the networks are
built by :class:`~distill_pl.methods.kd.KDRoles` (loaded from the teacher folder, kept as this
module's own attributes); this module runs the optimizer, EMA, validation, grid, checkpoints and export.
The teacher's network is not run in training (its outputs are stored); it is kept, frozen,
for the validation baseline and the monitoring grid: the teacher's own one-step sample.
The training loop (micro-batches, clipping, the non-finite policy, EMA, logging, checkpoint
hooks) is the one of every stage, :class:`~distill_pl.training.base.StageModule`.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from distill_pl.data.pair_metadata import PairExpectations, check_pairs_metadata
from distill_pl.diffusion.sampling import StudentSampler, one_step_sample
from distill_pl.diffusion.student_steps import student_noise_levels
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.context_parallel import stage_context_parallel
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.export.model_folders import export_student_of_run
from distill_pl.models.sharding import is_sharded, shard_stage_networks
from distill_pl.export.model_folders import load_scheduler, scheduler_shift
from distill_pl.methods.kd import KDObjective, KDRoles, kd_loss
from distill_pl.methods.roles import folder_denoisers
from distill_pl.training.batch import batch_conditioning, clip_latents, give_first_frames
from distill_pl.training.base import StageModule
from distill_pl.training.nonfinite import NonFinitePolicy
from distill_pl.models.student_init import load_student_weights

#: frozen submodules that are rebuilt from their folders and never stored in checkpoints
FROZEN_PREFIXES = ("teacher.", "autoencoder.")
#: checkpoint key of the non-finite policy's counters
NONFINITE_KEY = "nonfinite"


class KDModule(StageModule):
    """One-step student trained by regression on stored teacher outputs.

    Args:
        teacher: local teacher folder (``transformer/`` + ``scheduler/``, e.g. ``teachers/tiny``
            or a Wan diffusers pipeline folder). Loaded frozen, in eval mode, never
            checkpointed; its scheduler's shift is the exported student's shift.
        student_init: None: the student starts as a copy of the teacher's weights (loaded in
            float32); else a diffusers folder or a KD/DMD2 ``.ckpt`` (EMA weights preferred).
        vae_path: local VAE (or pipeline) folder for a latent model; None = pixel space.
        lr, betas, weight_decay: AdamW on the student, constant learning rate.
        ema_decay: if set, an EMA of the student (``student_ema``) is updated after every
            optimizer step and checkpointed.
        validate_with_ema: validation, the grid and the export use the EMA weights (if any).
        gradient_checkpointing: per-block recomputation in the student.
        teacher_dtype: parameter dtype of the frozen teacher (``"bfloat16"`` halves its memory).
        teacher_1step_guidance: CFG weight ``w`` (common form ``u + w (c - u)``) of the
            teacher's one-step baseline (grid row and ``val/teacher_1step_*``). None: the
            guidance the pairs were generated with (``pairs_metadata``), i.e. the teacher as
            it is used, only with one step instead of N.
        student_sigmas: the student's noise levels, decreasing from 1.0 (``[1.0]``: one step).
            More than one needs pairs with the teacher's trajectory at these levels after the
            first (generated with the kd_pairs stage's ``trajectory_sigmas`` holding them, and
            possibly others; see :mod:`distill_pl.methods.kd`).
        student_sigmas_shifted: False: the teacher's timestep shift is applied to
            ``student_sigmas``; True: they are the noise levels already.
        student_sampler: how a few-step student moves between its levels when it samples
            (validation, grid, export): ``"euler"``, deterministic Euler steps along the
            teacher-trajectory chords the loss trains, or ``"renoise"``, the clean estimate
            re-noised with fresh noise (DMD2's sampler). Same for one step.
        denoiser_options: the adapter's own options for teacher and student (e.g. a
            ControlNet's ``control_scale``, ``freeze_control_branch``), as ``load_denoiser`` takes them.
        export_dir: at the end of fit, the student (EMA weights if enabled) is written there as
            a teacher-style folder: ``transformer/``, a flow-match Euler ``scheduler/`` with
            the teacher's shift (one Euler step is ``eps - v(eps, 1)``) and
            ``student_steps.json`` (its noise levels).
        max_nonfinite_steps: a step with a non-finite loss or gradient is skipped (no weight,
            optimizer state or EMA moves) and counted; this many in a row stop the run with an
            error (:mod:`distill_pl.training.nonfinite`).
        accumulate_micro_batches: micro-batches per optimizer step: each loaded batch (the data
            batch size, per device) is split into this many, of sizes that differ by at most
            one, each with its own forward and backward (gradient accumulation).
        grad_clip: max total gradient norm of the student (None: no clipping; the norm is
            logged either way as ``train/grad_norm_student``).
        compile: regional compilation (``torch.compile`` of each transformer block, see
            :meth:`~distill_pl.models.denoiser.Denoiser.compile_blocks`) of the student (the
            network KD's steps run), at the start of fit (after any sharding); the first
            steps then take the compile time.
        context_parallel: ``{ulysses: N, ring: M}``: every pass of every network is split over
            the tokens of a group of N x M processes (see
            :mod:`distill_pl.models.context_parallel`; needs the FSDP2 strategy and a family with a
            context-parallel plan; ring needs CUDA); None (default): no splitting.

    Batches are KD pairs (``data.mode: pairs``): ``noise`` and ``teacher_output``
    [B, C, T, H, W] in the student's space, ``control`` [B, 3, T, H, W] pixels in [-1, 1],
    ``text_embeds`` [B, L, D], ``text_mask`` [B, L]; for a K-step student also
    ``teacher_trajectory`` [B, M, C, T, H, W] and ``trajectory_sigmas`` [B, M], the M >= K-1
    levels the pairs store: :meth:`check_pairs_metadata` finds the student's K-1 levels among
    the pairs' requested ``trajectory_sigmas`` and training uses those states only.

    Validation logs ``val/loss`` (KD loss of the evaluated student), PSNR / SSIM of the
    student's K-step sample (re-noising noise seeded by the batch index) against the teacher
    output (``val/student_psnr``,
    ``val/student_ssim``) and the same for the teacher's own one-step sample
    (``val/teacher_1step_psnr``, ``val/teacher_1step_ssim``): decoded pixels clamped to
    [-1, 1], ``data_range = 2``, PSNR per video then averaged, SSIM over all frames.
    """

    #: left out of checkpoints (also of distributed ones, see distill_pl.training.strategies)
    frozen_prefixes = FROZEN_PREFIXES
    stage_name = "KD"
    nonfinite_key = NONFINITE_KEY
    compiled_networks = ("student",)
    log_sync_dist = True

    def __init__(
        self,
        teacher: str,
        student_init: str | None = None,
        vae_path: str | None = None,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        ema_decay: float | None = None,
        validate_with_ema: bool = True,
        gradient_checkpointing: bool = False,
        teacher_dtype: str = "float32",
        teacher_1step_guidance: float | None = None,
        student_sigmas: list[float] = [1.0],
        student_sigmas_shifted: bool = False,
        student_sampler: StudentSampler = "euler",
        export_dir: str | None = None,
        max_nonfinite_steps: int = 20,
        denoiser_options: dict[str, object] | None = None,
        accumulate_micro_batches: int = 1,
        grad_clip: float | None = None,
        compile: bool = False,
        context_parallel: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if accumulate_micro_batches < 1:
            raise ValueError(f"accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")
        self.nonfinite = NonFinitePolicy("KD", max_nonfinite_steps)
        initialise_student = None if student_init is None else (
            lambda student: load_student_weights(student, student_init))
        roles = KDRoles.from_settings(self.hparams, folder_denoisers(teacher, denoiser_options),
                                      initialise_student=initialise_student)
        # the networks are this module's own attributes, in this order: the checkpoints' keys
        self.teacher = roles.teacher
        self.student = roles.student
        self.student_ema = roles.student_ema
        #: the context-parallel setting (None: off), read by the strategy and configure_model
        self.context_parallel = stage_context_parallel(context_parallel, self.student)
        self.autoencoder = build_autoencoder(vae_path)
        self.shift = scheduler_shift(load_scheduler(teacher))
        self.student_levels = student_noise_levels(student_sigmas, self.shift, student_sigmas_shifted)
        if export_dir:
            self.teacher.check_student_levels(self.student_levels)
        self.pairs_guidance: float | None = None
        self.pairs_steps: int | None = None
        #: which stored trajectory levels are the student's (None: the batch holds exactly those)
        self.trajectory_columns: list[int] | None = None
        self.negative_prompt = NegativePrompt()
        self.student_psnr = PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3, 4))
        self.teacher_psnr = PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3, 4))
        self.student_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.teacher_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)

    def train(self, mode: bool = True) -> "KDModule":
        """The teacher stays in eval mode whatever Lightning does with the module."""
        super().train(mode)
        self.teacher.eval()
        return self

    def configure_model(self) -> None:
        """Under FSDP2 (:class:`distill_pl.training.strategies.FSDP2Strategy`): shard the student, its
        EMA (same layout, so the EMA update is shard by shard) and the frozen teacher per
        transformer block; bf16 compute when the trainer's precision is ``bf16-mixed``."""
        ema = self.student_ema.module if self.student_ema else None
        shard_stage_networks(self, (self.teacher, self.student, ema))

    # --- data contract ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer:
            super().setup(stage)  # refuses fp16
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        metadata = getattr(datamodule, "pairs_metadata", None)
        if metadata is None:
            raise ValueError(
                "KDModule trains on KD pairs: set `data.mode: pairs` and `data.pairs_dir` "
                "(generate them first with the kd_pairs stage)"
            )
        hparams = getattr(datamodule, "hparams", {})
        self.check_pairs_metadata(metadata, hparams.get("pairs_dir") if hparams.get("mode") == "pairs" else None)
        self.negative_prompt.set_from(datamodule)

    def check_pairs_metadata(self, metadata: dict, pairs_dir: str | None = None) -> None:
        """Raise ValueError unless the pairs (``pairs_metadata``, see :mod:`distill_pl.data.pairs`)
        fit this run (:func:`distill_pl.data.pair_metadata.check_pairs_metadata`: same teacher
        content, adapter options, space, latent shape, control channels, the student's levels
        in the stored trajectory); then keep their guidance, step count and the columns of the
        student's levels in their trajectory."""
        columns = check_pairs_metadata(metadata, self.pair_expectations, pairs_dir)
        self.pairs_guidance = metadata.get("guidance")
        self.pairs_steps = metadata.get("num_steps")
        self.trajectory_columns = columns

    @functools.cached_property
    def pair_expectations(self) -> PairExpectations:
        """What this run needs of its pairs: the teacher folder (fingerprinted when first
        needed), the space, the student's channels, patch size and levels, the autoencoder's
        latent grid and the adapter's options."""
        defaults = {name: p.default for name, p in inspect.signature(type(self.teacher)).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return PairExpectations(
            teacher=self.hparams.teacher,
            vae_path=self.hparams.vae_path,
            latent_channels=self.student.latent_channels,
            patch_size=self.student.patch_size,
            latent_grid=self.autoencoder.latent_grid,
            control_channels=self.student.control_channels,
            encoded_control_channels=self.student.encoded_control_channels(self.autoencoder),
            student_levels=self.student_levels,
            denoiser_options=self.hparams.denoiser_options or {},
            option_defaults=defaults,
            adapter_options=tuple(self.teacher.adapter_options),
            training_options=tuple(self.teacher.training_options),
        )

    def set_negative_prompt(self, embeds: Tensor, mask: Tensor) -> None:
        """The [1, L, D] embedding (+ [1, L] mask) of the teacher's unconditional CFG branch."""
        self.negative_prompt.set(embeds, mask)

    @torch.no_grad()
    def pair_inputs(self, batch: dict) -> tuple[Tensor, Tensor, Conditioning]:
        """(noise, teacher_output, cond) of a pairs batch; the control is encoded like the
        clip (identity in pixel space) and left out for a model without control input; pairs
        generated with conditional frames give the student the same first latent frames of
        the clip (``num_cond_frames``)."""
        cond = batch_conditioning(batch, self.autoencoder, self.student)
        if "num_cond_frames" in batch:  # the clip's first frames the teacher was given
            cond = give_first_frames(cond, clip_latents(batch, self.autoencoder), batch["num_cond_frames"])
        return batch["noise"].float(), batch["teacher_output"].float(), cond

    # --- the networks as samplers -------------------------------------------------------
    @property
    def eval_student(self) -> Denoiser:
        """The student used for validation, the grid and the export (EMA if enabled)."""
        if self.student_ema is not None and self.hparams.validate_with_ema:
            return self.student_ema.module
        return self.student

    @property
    def teacher_guidance(self) -> float:
        if self.hparams.teacher_1step_guidance is not None:
            return float(self.hparams.teacher_1step_guidance)
        return float(self.pairs_guidance) if self.pairs_guidance is not None else 1.0

    def objective(self, student: Denoiser | None = None) -> KDObjective:
        """The KD objective of ``student`` (default: the trained one) at the student's levels."""
        return KDObjective(self.student if student is None else student, self.student_levels,
                           self.hparams.student_sampler)

    def student_sample(self, student: Denoiser, noise: Tensor, cond: Conditioning, seed: int = 0) -> Tensor:
        """The K-step sample of ``student`` with the run's sampler (re-noising noise, if it
        re-noises, from ``seed``)."""
        return self.objective(student).generate(noise, cond, torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def teacher_1step(self, noise: Tensor, cond: Conditioning) -> Tensor:
        w = self.teacher_guidance
        uncond = None
        if w != 1.0:
            uncond = self.negative_prompt.conditioning(cond)
        return one_step_sample(velocity_fn(self.teacher, cond, uncond, w), noise)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels [B, 3, T, H, W] clamped to [-1, 1] (float32)."""
        with torch.no_grad():
            return self.autoencoder.decode(latents.float()).float().clamp(-1.0, 1.0)

    # --- training -----------------------------------------------------------------------
    def phase_optimizer(self, phase: int) -> tuple[int, dict[str, torch.nn.Module], float | None]:
        return 0, {"student": self.student}, self.hparams.grad_clip

    def phase_loss(self, phase: int, batch: dict, draws: None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The KD loss of a (micro-)batch of pairs (:class:`~distill_pl.methods.kd.KDObjective`)."""
        noise, target, cond = self.pair_inputs(batch)
        trajectory, trajectory_sigmas = batch.get("teacher_trajectory"), batch.get("trajectory_sigmas")
        if self.trajectory_columns is not None and trajectory is not None and trajectory_sigmas is not None:
            trajectory = trajectory[:, self.trajectory_columns]
            trajectory_sigmas = trajectory_sigmas[:, self.trajectory_columns]
        loss = self.objective().loss(noise, target, cond, trajectory, trajectory_sigmas)
        return loss, {"loss": loss}

    def after_update(self, phase: int, skipped_experts: dict[str, tuple[str, ...]]) -> None:
        """The EMA update, after every applied (not skipped) optimizer step (an expert whose
        own update was skipped keeps its average)."""
        if self.student_ema is not None:
            self.student_ema.update(self.student, skip=skipped_experts.get("student", ()))

    def sharded_networks(self) -> tuple[torch.nn.Module, ...]:
        return (self.student,) if is_sharded(self.student) else ()

    def configure_optimizers(self):
        return torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],  # e.g. a frozen control branch
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )

    # --- validation and monitoring ------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        noise, target, cond = self.pair_inputs(batch)
        b = noise.shape[0]
        x_student = self.student_sample(self.eval_student, noise, cond, seed=batch_idx)
        x_teacher = self.teacher_1step(noise, cond)
        self.log("val/loss", kd_loss(x_student, target, cond), prog_bar=True, batch_size=b, sync_dist=True)
        reference = self.decode(target)
        for video, psnr, ssim in (
            (self.decode(x_student), self.student_psnr, self.student_ssim),
            (self.decode(x_teacher), self.teacher_psnr, self.teacher_ssim),
        ):
            psnr.update(video, reference)
            ssim.update(_frames(video), _frames(reference))
        self.log("val/student_psnr", self.student_psnr, prog_bar=True, batch_size=b)
        self.log("val/student_ssim", self.student_ssim, batch_size=b)
        self.log("val/teacher_1step_psnr", self.teacher_psnr, batch_size=b)
        self.log("val/teacher_1step_ssim", self.teacher_ssim, batch_size=b)

    @torch.no_grad()
    def grid_rows(self, batch: dict, seed: int) -> dict[str, Tensor]:
        """Rows of the monitoring grid (see callbacks.FrameGridLogger), pixels [B, 3, T, H, W].

        The noise is the stored noise of each pair; ``seed`` seeds a K-step student's
        re-noising noise.
        """
        noise, target, cond = self.pair_inputs(batch)
        steps = f"{self.pairs_steps}-step" if self.pairs_steps else "N-step"
        control = "control" if self.student.control_channels else "control (unused)"
        return {
            f"student {len(self.student_levels)}-step":
                self.decode(self.student_sample(self.eval_student, noise, cond, seed)),
            f"teacher 1-step w={self.teacher_guidance:g}": self.decode(self.teacher_1step(noise, cond)),
            control: batch["control"].float(),
            f"teacher {steps} (GT)": self.decode(target),
        }

    # --- export (the checkpoint hooks are StageModule's) -----------------------------------
    def export(self, export_dir: str) -> None:
        export_student_of_run(self.trainer, self.eval_student, export_dir, self.shift,
                              self.student_levels, self.hparams.teacher, self.hparams.student_sampler)


def _frames(video: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (SSIM is computed per frame)."""
    return video.transpose(1, 2).flatten(0, 1)

