"""The KD objective: regress a one- or few-step student on the teacher's stored samples, no Lightning.

One step (``student_sigmas = (1.0,)``): ``x_g = eps - S(eps, 1, c)`` and
``L_KD = mean((x_g - x_teacher)^2)`` with ``x_teacher`` the teacher's N-step output from
the same noise ``eps``, text and control.

K steps at the noise levels ``s_0 = 1 > s_1 > ... > s_{K-1}`` need the teacher's trajectory
from the same run: ``teacher_trajectory`` [B, K-1, C, T, H, W], the teacher's noisy state
``x_k`` at its first step whose sigma is <= ``s_k`` (k = 1 .. K-1), at the levels
``trajectory_sigmas`` [B, K-1] actually stored. Step k starts from the teacher's state
(``x_0 = eps`` at sigma 1, else ``x_k`` at its stored sigma ``r_k``) and its target is the
teacher's state at the next level, ``x_{k+1}`` at ``r_{k+1}`` (the last step's:
``teacher_output`` at 0). The student's state at the next level is formed by the Euler step
of its velocity, ``x_k + (r_{k+1} - r_k) S(x_k, r_k, c)``: the flow along the student's
straight line from ``x_k`` through its clean estimate ``x0 = x_k - r_k S``, so the last
step's is exactly that clean estimate. ``L_KD`` is the mean over the K steps of
``mean((Euler step - teacher state)^2)``; K = 1 is the one-step loss above.

With conditional frames (``Conditioning.cond_latents``: the clip's first latent frames, given
to the teacher and the student alike), each sample's mean runs over its generated frames
only, and the batch mean over the samples.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from distill_pl.diffusion.conditional_frames import masked_mean
from distill_pl.diffusion.flow import expand_like
from distill_pl.diffusion.sampling import StudentSampler, student_sample
from distill_pl.methods.roles import DenoiserFactory, Roles, build_dtype
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.ema import EMA
from distill_pl.models.guidance import sampling_velocity_fn


def kd_loss(x_g: Tensor, x_teacher: Tensor, cond: Conditioning | None = None) -> Tensor:
    """``L_KD = mean((x_g - x_teacher)^2)`` in float32; with conditional frames in ``cond``,
    the mean per sample over the frames it generates, then over the samples."""
    error = (x_g.float() - x_teacher.float()).square()
    keep = None if cond is None or cond.num_cond_frames is None else cond.generated_frames(error.shape[2])
    return masked_mean(error, keep)


@dataclass(eq=False)
class KDObjective:
    """The student, its noise levels (already shifted) and its sampler; see the module
    docstring. ``sampler="euler"`` (the default) samples along the chords the loss trains;
    ``"renoise"`` re-noises the clean estimate between levels instead."""

    student: nn.Module
    student_sigmas: tuple[float, ...] = (1.0,)
    sampler: StudentSampler = "euler"

    @property
    def num_steps(self) -> int:
        return len(self.student_sigmas)

    def generate(self, noise: Tensor, cond: Conditioning, generator: torch.Generator | None = None) -> Tensor:
        """The student's K-step sample from ``noise`` [B, C, T, H, W] with its sampler (the
        re-noising one draws fresh noise from ``generator``); gradients follow the caller's mode."""
        return student_sample(sampling_velocity_fn(self.student, noise, cond), noise, self.student_sigmas,
                              self.sampler, generator)

    def loss(
        self,
        noise: Tensor,
        teacher_output: Tensor,
        cond: Conditioning,
        teacher_trajectory: Tensor | None = None,
        trajectory_sigmas: Tensor | None = None,
    ) -> Tensor:
        """``L_KD`` of one batch (see the module docstring for the shapes)."""
        if self.num_steps == 1:
            return kd_loss(self.generate(noise, cond), teacher_output, cond)
        expected = self.num_steps - 1
        if teacher_trajectory is None or trajectory_sigmas is None:
            raise ValueError(
                f"a {self.num_steps}-step KD student needs pairs with the teacher's trajectory at its "
                "noise levels (batch keys teacher_trajectory and trajectory_sigmas); generate the pairs "
                "with the student's sigmas stored"
            )
        if teacher_trajectory.shape[1] != expected or trajectory_sigmas.shape[1] != expected:
            raise ValueError(
                f"a {self.num_steps}-step KD student needs {expected} trajectory states per pair, the "
                f"batch holds {teacher_trajectory.shape[1]} (teacher_trajectory) and "
                f"{trajectory_sigmas.shape[1]} (trajectory_sigmas)"
            )
        b = noise.shape[0]
        states = [noise.float(), *teacher_trajectory.float().unbind(1), teacher_output.float()]
        ones, zeros = noise.new_ones(b, 1).float(), noise.new_zeros(b, 1).float()
        levels = torch.cat([ones, trajectory_sigmas.float().to(ones.device), zeros], dim=1)  # [B, K+1]
        losses = []
        for k in range(self.num_steps):
            x, r, r_next = states[k], levels[:, k], levels[:, k + 1]
            v = self.student(x, r.to(x), cond)
            stepped = x + expand_like(r_next - r, x) * v.float()
            losses.append(kd_loss(stepped, states[k + 1], cond))
        return torch.stack(losses).mean()


class KDRoles(Roles):
    """KD's networks: ``student`` (trained, float32), ``teacher`` (frozen, eval mode, in
    ``teacher_dtype``; its outputs are stored in the pairs, it runs for validation and the
    grid) and ``student_ema`` (an :class:`~distill_pl.models.ema.EMA` of the student, or None).
    One phase: the KD step trains the student. Each sample of a batch (a KD pair) carries
    its noise and the teacher's output."""

    phases = {"KD step": ("student",)}
    batch_latents = 2

    def __init__(self, student: Denoiser, teacher: Denoiser, student_ema: EMA | None, dtypes: dict[str, str]) -> None:
        super().__init__(dtypes)
        self.student = student
        self.teacher = teacher
        self.student_ema = student_ema

    @classmethod
    def from_settings(
        cls,
        settings: Mapping,
        make: DenoiserFactory,
        compute_dtype: str | None = None,
        initialise_student: Callable[[Denoiser], object] | None = None,
    ) -> "KDRoles":
        """The roles on the current device from KD's settings (``KDModule``'s arguments by
        name; read: ``teacher_dtype``, ``gradient_checkpointing``, ``ema_decay``).

        The teacher is made once; a float32 teacher's student is its copy, else the student
        is made in float32. ``initialise_student(student)`` (e.g. loading ``student_init``)
        runs before the EMA copies the student. ``compute_dtype``: see
        :func:`~distill_pl.methods.roles.build_dtype`.
        """
        teacher_dtype = settings["teacher_dtype"]
        teacher = make(build_dtype(teacher_dtype, compute_dtype), False).eval().requires_grad_(False)
        if teacher_dtype == "float32":
            student = copy.deepcopy(teacher).requires_grad_(True)
        else:  # keep the student's master weights in float32
            student = make(build_dtype("float32", compute_dtype), False)
        if initialise_student is not None:
            initialise_student(student)
        student.set_gradient_checkpointing(settings["gradient_checkpointing"])
        student.train()
        ema = EMA(student, settings["ema_decay"]) if settings["ema_decay"] is not None else None
        dtypes = {"student": "float32", "teacher": teacher_dtype, "student_ema": "float32"}
        return cls(student, teacher, ema, dtypes)

    def phase_losses(self, settings: Mapping, latents: Callable[[], Tensor], sigma: Tensor,
                     cond: Conditioning) -> dict[str, Callable[[], Tensor]]:
        """Phase -> its loss on given inputs, for measuring a step: the one-step student's
        ``L_KD`` from noise ``latents()`` to a target ``latents()`` (each call a new [B, C, T,
        H, W] tensor). ``settings`` and ``sigma`` [B] are not used (KD draws no noise level)."""
        objective = KDObjective(self.student)
        noise, target = latents(), latents()
        return {"KD step": lambda: objective.loss(noise, target, cond)}
