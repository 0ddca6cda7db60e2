"""The DMD2 objective: the four networks a DMD2 step needs and its losses, no Lightning.

Notation (rectified flow, ``x_s = (1 - s) x0 + s eps``, networks predict ``v = eps - x0``):

- ``student``: a K-step generator called at the noise levels ``student_sigmas``
  ``s_0 = 1 > s_1 > ... > s_{K-1}`` (already shifted); one step at level ``s_k`` gives the
  clean estimate ``x0 = x - s_k S(x, s_k, c)``, re-noised with fresh noise to ``s_{k+1}``
  (:func:`~distill_pl.diffusion.sampling.few_step_sample`). K = 1: ``x_g = eps - S(eps, 1, c)``.
- ``teacher``: the frozen CFG teacher (the "real" score), guidance ``w`` in ``u + w (c - u)``
  (a two-expert teacher: ``guidance_2`` at the levels of its low-noise expert, if set).
- ``fake_score``: tracks the score of the student's samples (flow matching on them).
- ``discriminator``: a head on block ``feature_block`` of the fake score (``discriminator_on=
  "fake_score"``) or of the teacher (``"teacher"``).

The trained step. Each sample of a step trains one student step ``k`` (:class:`DMD2Draws`
``step``; always 0 for K = 1) with gradient; its input at ``s_k`` is, for ``k > 0``,
``trained_step_input``:

- ``"backward_simulation"``: the student's own chain from the sample's ``eps``, run without
  gradient through steps ``0 .. k-1`` with the draws' re-noising noises;
- ``"noised_real"``: the real clip noised to ``s_k``, ``(1 - s_k) x_real + s_k n``.

Its clean estimate ``x_g`` then enters the critic and generator losses of DMD2 exactly as the
one-step student's does (``x_t = (1 - sigma) x_g + sigma n``, ``sigma`` from the shifted
``t ~ U[t_min, t_max]``).

Phased DMD (``phased=True``, backward simulation only): the noise range is split into
phases, trained one after the other (the caller gives the phase). The phase boundaries are
``phase_boundaries`` (some of the student's levels, strictly inside (0, 1); None: every level
``s_1 .. s_{K-1}``, one step per phase, the K subintervals ``(s_{k+1}, s_k]``, ``s_K = 0``);
a phase is the interval ``(s, s']`` between consecutive boundaries (1 and 0 at the ends) and
holds the steps whose levels lie in it (:func:`~distill_pl.diffusion.student_steps.phase_steps`).
In a phase every sample trains one of the phase's steps ``k`` (drawn uniformly with its other
draws; the phase's only step with one per phase), its input the student's own chain without
gradient; its clean estimate ``x0`` is carried to the phase's lower end ``s``,
``x_s = (1 - s) x0 + s n`` with ``n`` the noise the chain re-noises step ``k``'s output with
(the sampler's own re-noising; for the last phase, ``s = 0``, the clean estimate). The critic
and DMD terms diffuse that state to ``sigma`` in the phase's interval
(``sigma = s + (s' - s) u``, ``u ~ U[t_min, t_max]``, no further shift) with
:func:`~distill_pl.diffusion.student_steps.diffuse_from`
(``x_sigma = a x_s + b eps``, ``a = (1 - sigma) / (1 - s)``, ``b^2 = sigma^2 - a^2 s^2``),
and the fake score is trained there with the subinterval target of
:func:`~distill_pl.diffusion.student_steps.subinterval_flow_target` (score matching within the
subinterval). The DMD gradient acts on the state ``x_s``; its normaliser is the mean
``|x0 - x0_real|`` of the step's clean estimate.

Decoupled DMD (``decoupled=True``): the DMD gradient is ``dm_weight * dm + ca_weight * ca``,
its distribution-matching and CFG-augmentation terms
(:func:`~distill_pl.diffusion.dmd.decoupled_dmd_terms`), each term at its own noise level:
``sigma`` from ``t ~ U[dm_t_min, dm_t_max]`` for DM and ``U[ca_t_min, ca_t_max]`` for CA
(mapped to ``sigma`` as the shared ``t`` is; None: the shared ``t_min`` / ``t_max``). The
choices where the split leaves room:

- each term at its own sigma has its own noised input ``x_t = (1 - sigma) x_g + sigma n``
  with its own noise ``n``; the fake score runs at the DM term's ``x_t`` only (the CA term
  needs no fake score), the teacher's two branches at each term's ``x_t``;
- each term's normaliser is today's, at its own ``x_t``: ``k = mean |x_g - x0_cfg|`` with
  ``x0_cfg`` the teacher's CFG clean estimate there (so the DM term costs an unconditional
  teacher branch beside the conditional one it uses);
- the weights default to 1;
- with both ranges the shared one (the default) no extra sigma or noise is drawn: both terms
  use the step's ``sigma`` and ``noise``, and ``dm_weight = ca_weight = 1`` gives the DMD
  gradient of ``decoupled=False`` up to float rounding (the teacher's clean estimates are
  combined after, not before, the velocity-to-x0 conversion). Otherwise
  (:attr:`DMD2Objective.decoupled_schedule`) each sample draws ``sigma_dm, noise_dm,
  sigma_ca, noise_ca`` after all its other draws, so the other draws stay those of the
  coupled objective; the critic and the GAN term keep the shared ``sigma`` and ``noise``.

The generator loss logs, beside the losses: ``dmd_grad_norm`` (mean over samples of the L2
norm of the DMD gradient), ``teacher_fake_x0_gap`` (mean ``|x0_real - x0_fake|``, at the DM
term's ``x_t``), ``fake_score_loss_fresh`` (the fake score's flow-matching loss on the
current student's samples, which it has not been trained on: the no-gradient fake-score pass
the DMD term needs anyway, scored against the flow-matching target; no extra forward) and,
with ``decoupled``, ``dmd_dm_norm`` and ``dmd_ca_norm`` (the same norm of each unweighted
term).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Callable, Literal, Mapping, get_args

import torch
from torch import Tensor, nn

from distill_pl.diffusion.conditional_frames import draw_num_conditional_frames
from distill_pl.diffusion.dmd import (
    decoupled_dmd_terms,
    dmd_gradient,
    dmd_loss,
    dmd_normaliser,
    gan_discriminator_loss,
    gan_generator_loss,
    per_sample_norm,
)
from distill_pl.diffusion.flow import (
    add_noise,
    classifier_free_guidance,
    expand_like,
    velocity,
    x0_from_velocity,
)
from distill_pl.diffusion.losses import sample_training_sigma
from distill_pl.diffusion.sampling import few_step_sample
from distill_pl.diffusion.student_steps import (
    diffuse_from,
    phase_boundary_indices,
    phase_steps,
    subinterval_bounds,
    subinterval_flow_target,
)
from distill_pl.methods.roles import DenoiserFactory, Roles, build_dtype
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.discriminator import DiscriminatorHead
from distill_pl.models.ema import EMA
from distill_pl.models.guidance import branch_velocities, velocity_fn
from distill_pl.models.lora import add_lora
from distill_pl.util.randomness import randn

TrainedStepInput = Literal["backward_simulation", "noised_real"]
#: a two-expert teacher's fake score: a copy of the teacher (one expert per noise range, each
#: trained on its own levels) or one expert's copy serving every level (see :func:`shared_fake_score`)
FakeScoreExperts = Literal["per_expert", "shared"]
FAKE_SCORE_EXPERTS = get_args(FakeScoreExperts)


def check_trained_step_input(trained_step_input: str, phased: bool) -> None:
    """Raise ValueError for an unknown ``trained_step_input`` or one Phased DMD cannot use."""
    if trained_step_input not in ("backward_simulation", "noised_real"):
        raise ValueError(f"trained_step_input must be 'backward_simulation' or 'noised_real', "
                         f"got {trained_step_input!r}")
    if phased and trained_step_input != "backward_simulation":
        raise ValueError("Phased DMD trains each step on the student's own chain: "
                         "trained_step_input must be 'backward_simulation'")


@dataclass
class DMD2Draws:
    """The random draws of one DMD2 step, one row per sample.

    eps [B, C, T, H, W]: the student's noise at sigma = 1. sigma [B]: the noise level of the
    critic and DMD terms. noise, noise_real [B, C, T, H, W]: the noises of the student's and
    the real sample at ``sigma``. step [B] int64: the trained student step. renoise
    [B, K-1, C, T, H, W]: the fresh noises of the student's chain (re-noising to
    ``s_1 .. s_{K-1}``; with ``noised_real`` the noise of the real clip at ``s_k`` is
    ``renoise[:, k-1]``). sigma_dm, sigma_ca [B] and noise_dm, noise_ca [B, C, T, H, W]: the
    noise levels and noises of the two terms of Decoupled DMD under its own schedule (None
    otherwise; see the module docstring). num_cond_frames [B] int64: how many leading latent
    frames of the real clip the sample is given as conditional frames (None: no draw, the
    model takes none or the run turned them off).
    """

    eps: Tensor
    sigma: Tensor
    noise: Tensor
    noise_real: Tensor
    step: Tensor
    renoise: Tensor
    sigma_dm: Tensor | None = None
    noise_dm: Tensor | None = None
    sigma_ca: Tensor | None = None
    noise_ca: Tensor | None = None
    num_cond_frames: Tensor | None = None

    def rows(self, rows: slice) -> "DMD2Draws":
        return DMD2Draws(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                            for f in fields(self)})

    @staticmethod
    def cat(draws: list["DMD2Draws"]) -> "DMD2Draws":
        return DMD2Draws(**{f.name: None if getattr(draws[0], f.name) is None
                            else torch.cat([getattr(d, f.name) for d in draws]) for f in fields(DMD2Draws)})


@dataclass
class StudentOutput:
    """The trained step's output: ``sample`` [B, ...] (the generator's sample the losses see:
    the clean estimate, or under Phased DMD the state at ``level``), its clean estimate ``x0``
    and ``level`` [B] (None: ``sample`` is clean)."""

    sample: Tensor
    x0: Tensor
    level: Tensor | None = None


@dataclass(eq=False)
class DMD2Objective:
    """The networks of DMD2 and its losses (see the module docstring for the conventions).

    ``student_sigmas`` are the student's noise levels (already shifted); ``shift``, ``t_min``,
    ``t_max`` give ``sigma = shift(t)``, ``t ~ U[t_min, t_max]``; ``phased``,
    ``phase_boundaries``: Phased DMD and its phase boundaries (members of ``student_sigmas``
    inside (0, 1), decreasing; None: one phase per step; ValueError otherwise, or without
    ``phased``); ``critic_gan_weight`` weighs
    the discriminator loss in the critic loss, ``gan_weight`` the GAN term of the generator.
    ``decoupled``, ``dm_weight``, ``ca_weight``, ``dm_t_min``, ``dm_t_max``, ``ca_t_min``,
    ``ca_t_max``: Decoupled DMD (module docstring; the ranges None: ``t_min`` / ``t_max``).
    ``conditional_frame_probabilities``: how often 0, 1, 2, ... leading latent frames of the
    real clip are given to the networks as conditional frames (() = never); on them the
    networks' clean estimates are the given latents, so every loss there is zero.
    ``guidance_2``: a two-expert teacher's CFG weight at the levels its low-noise expert
    denoises (None: ``guidance`` everywhere; not with ``decoupled``).
    """

    student: nn.Module
    teacher: nn.Module
    fake_score: nn.Module
    discriminator: nn.Module
    feature_block: int
    guidance: float = 6.0
    gan_weight: float = 1e-3
    critic_gan_weight: float = 1.0
    discriminator_on: Literal["fake_score", "teacher"] = "fake_score"
    student_sigmas: tuple[float, ...] = (1.0,)
    trained_step_input: TrainedStepInput = "backward_simulation"
    phased: bool = False
    phase_boundaries: tuple[float, ...] | None = None
    shift: float = 1.0
    t_min: float = 0.02
    t_max: float = 0.98
    decoupled: bool = False
    dm_weight: float = 1.0
    ca_weight: float = 1.0
    dm_t_min: float | None = None
    dm_t_max: float | None = None
    ca_t_min: float | None = None
    ca_t_max: float | None = None
    conditional_frame_probabilities: tuple[float, ...] = ()
    guidance_2: float | None = None

    def __post_init__(self) -> None:
        check_trained_step_input(self.trained_step_input, self.phased)
        if self.phase_boundaries is not None:
            if not self.phased:
                raise ValueError("phase_boundaries is a setting of Phased DMD: set phased (phased_dmd) to use it")
            phase_boundary_indices(self.phase_boundaries, self.student_sigmas)
        if self.decoupled and self.guidance_2 is not None:
            raise ValueError("guidance_2 is not supported with Decoupled DMD (decoupled_dmd): its CA term "
                             "takes one guidance weight; leave guidance_2 unset (null)")
        own = (self.dm_weight, self.ca_weight, self.dm_t_min, self.dm_t_max, self.ca_t_min, self.ca_t_max)
        if not self.decoupled and own != (1.0, 1.0, None, None, None, None):
            raise ValueError("dm_weight, ca_weight and the dm_/ca_ t ranges are settings of Decoupled DMD: "
                             "set decoupled (decoupled_dmd) to use them")
        for name, (lo, hi) in {"dm": self.dm_t_range, "ca": self.ca_t_range}.items():
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"need 0 <= {name}_t_min < {name}_t_max <= 1, got {lo}, {hi}")

    @property
    def num_steps(self) -> int:
        return len(self.student_sigmas)

    @property
    def phase_steps(self) -> list[range]:
        """Phased DMD: the student steps of each phase, highest noise first (one per step when
        :attr:`phase_boundaries` is None; see :func:`~distill_pl.diffusion.student_steps.phase_steps`)."""
        return phase_steps(self.student_sigmas, self.phase_boundaries)

    @property
    def dm_t_range(self) -> tuple[float, float]:
        """The DM term's ``t`` range (``t_min`` / ``t_max`` where unset)."""
        return (self.t_min if self.dm_t_min is None else self.dm_t_min,
                self.t_max if self.dm_t_max is None else self.dm_t_max)

    @property
    def ca_t_range(self) -> tuple[float, float]:
        """The CA term's ``t`` range (``t_min`` / ``t_max`` where unset)."""
        return (self.t_min if self.ca_t_min is None else self.ca_t_min,
                self.t_max if self.ca_t_max is None else self.ca_t_max)

    @property
    def decoupled_schedule(self) -> bool:
        """Decoupled DMD with a term range other than the shared one: the terms draw their own
        sigma and noise."""
        shared = (self.t_min, self.t_max)
        return self.decoupled and (self.dm_t_range != shared or self.ca_t_range != shared)

    # --- draws -----------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, shape: tuple[int, ...], like: Tensor, phase: int = 0) -> DMD2Draws:
        """One sample's draws (``shape`` = [1, C, T, H, W]) from ``generator``, in the order
        eps, sigma, noise, noise_real, then (K > 1) the trained step (uniform among all steps,
        or under Phased DMD with :attr:`phase_boundaries` among the phase's steps; not drawn
        under Phased DMD without them: the phase's one step) and the re-noising noises,
        then (:attr:`decoupled_schedule`) sigma_dm, noise_dm, sigma_ca, noise_ca, then (with
        :attr:`conditional_frame_probabilities`) the number of conditional frames.
        ``phase``: the Phased DMD phase being trained (ignored otherwise)."""
        k_steps = self.num_steps
        eps = randn(shape, generator, like)
        sigma = self._draw_sigma(generator, like, phase, self.t_min, self.t_max)
        noise, noise_real = randn(shape, generator, like), randn(shape, generator, like)
        steps = self.phase_steps[phase] if self.phased else range(k_steps)
        if k_steps == 1 or (self.phased and self.phase_boundaries is None):  # one step to train: no draw
            step = torch.full((1,), steps.start, dtype=torch.long, device=like.device)
        else:
            drawn = torch.randint(len(steps), (1,), generator=generator, device=generator.device)
            step = (steps.start + drawn).to(like.device)
        renoise = randn((1, k_steps - 1, *shape[1:]), generator, like)
        draws = DMD2Draws(eps, sigma, noise, noise_real, step, renoise)
        if self.decoupled_schedule:
            draws.sigma_dm = self._draw_sigma(generator, like, phase, *self.dm_t_range)
            draws.noise_dm = randn(shape, generator, like)
            draws.sigma_ca = self._draw_sigma(generator, like, phase, *self.ca_t_range)
            draws.noise_ca = randn(shape, generator, like)
        if self.conditional_frame_probabilities:
            counts = draw_num_conditional_frames(1, self.conditional_frame_probabilities, generator)
            draws.num_cond_frames = counts.to(like.device)
        return draws

    def _draw_sigma(self, generator: torch.Generator, like: Tensor, phase: int, t_min: float, t_max: float) -> Tensor:
        """One noise level [1] from ``t ~ U[t_min, t_max]``: shifted, or under Phased DMD mapped
        into the subinterval of ``phase``."""
        if self.phased:
            lo, hi = subinterval_bounds(self.student_sigmas, self.phase_boundaries)[phase]
            u = sample_training_sigma(1, 1.0, t_min, t_max, generator=generator)
            return (lo + (hi - lo) * u).to(like)
        return sample_training_sigma(1, self.shift, t_min, t_max, generator=generator).to(like)

    def draw_batch(self, generators: list[torch.Generator], shape: tuple[int, ...], like: Tensor,
                   phase: int = 0) -> DMD2Draws:
        """A batch's draws (``shape`` = [B, C, T, H, W]), sample ``j`` from ``generators[j]``
        exactly as :meth:`draw` draws it (the rows of the per-sample draws, concatenated)."""
        if len(generators) != shape[0]:
            raise ValueError(f"draw_batch needs one generator per sample: {len(generators)} for shape {tuple(shape)}")
        return DMD2Draws.cat([self.draw(g, (1, *shape[1:]), like, phase) for g in generators])

    # --- the student -------------------------------------------------------------------------
    def generate(self, eps: Tensor, cond: Conditioning, generator: torch.Generator | None = None,
                 renoise: list[Tensor] | None = None) -> Tensor:
        """The student's K-step sample from ``eps`` (re-noising noises from ``renoise`` or
        ``generator``; gradients follow the caller's mode). K = 1: ``eps - S(eps, 1, c)``."""
        return few_step_sample(lambda x, s: self.student(x, s, cond), eps, self.student_sigmas, generator, renoise)

    def trained_step(self, draws: DMD2Draws, cond: Conditioning, x_real: Tensor | None = None) -> StudentOutput:
        """The trained step of each sample (gradient through that step only; see the module
        docstring). ``x_real`` [B, ...] (latents) is needed with ``noised_real`` when K > 1.
        Phased DMD: every sample must be in one phase (its steps in one of :attr:`phase_steps`),
        else ValueError."""
        levels = torch.tensor(self.student_sigmas, dtype=draws.eps.dtype, device=draws.eps.device)
        k = draws.step
        end = self.num_steps  # the index of the phase's lower end (K: clean)
        if self.phased:
            phases = self.phase_steps
            of_step = [p for p, steps in enumerate(phases) for _ in steps]
            trained = sorted({of_step[i] for i in k.tolist()})
            if len(trained) > 1:
                raise ValueError(f"Phased DMD trains one phase per batch, but its draws mix the steps "
                                 f"{sorted(set(k.tolist()))} of the phases {trained}: draw the whole batch in one phase")
            end = phases[trained[0]].stop
        x = self._step_input(draws, cond, x_real)
        s_k = levels[k]
        x0 = x0_from_velocity(x, s_k, self.student(x, s_k, cond))
        if end == self.num_steps:
            return StudentOutput(x0, x0)
        # Phased DMD before its last phase: the trained step's clean estimate carried to the
        # phase's lower end with the noise the chain re-noises it with
        lower = levels[end].repeat(len(k))
        fresh = draws.renoise[torch.arange(len(k)), k]
        return StudentOutput(add_noise(x0, fresh, lower), x0, lower)

    @torch.no_grad()
    def _step_input(self, draws: DMD2Draws, cond: Conditioning, x_real: Tensor | None) -> Tensor:
        """The input at ``s_k`` of each sample's trained step (no gradient)."""
        k = draws.step
        top = int(k.max())
        if top == 0:
            return draws.eps
        levels = torch.tensor(self.student_sigmas, dtype=draws.eps.dtype, device=draws.eps.device)
        rows = torch.arange(len(k), device=k.device)
        if self.trained_step_input == "noised_real":
            if x_real is None:
                raise ValueError("trained_step_input='noised_real' needs the real clips (x_real)")
            noised = add_noise(x_real, draws.renoise[rows, (k - 1).clamp_min(0)], levels[k])
            return torch.where(expand_like(k, noised) > 0, noised, draws.eps)
        x = draws.eps
        for i in range(top):  # the student's own chain, each sample stopping at its step
            s_i = levels[i].expand(len(k))
            x0 = x0_from_velocity(x, s_i, self.student(x, s_i, cond))
            renoised = add_noise(x0, draws.renoise[:, i], levels[i + 1])
            x = torch.where(expand_like(k, x) > i, renoised, x)
        return x

    # --- losses ------------------------------------------------------------------------------
    def _noised(self, x: Tensor, level: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
        """``x`` (clean, or at ``level``) diffused to ``sigma``."""
        return add_noise(x, noise, sigma) if level is None else diffuse_from(x, level, sigma, noise)

    def _features_for_discriminator(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> tuple[Tensor | None, Tensor]:
        """(velocity of the fake score or None, block features) for the discriminator."""
        k = self.feature_block
        if self.discriminator_on == "fake_score":
            return self.fake_score(x, sigma, cond, feature_block=k)
        return None, self.teacher(x, sigma, cond, feature_block=k)[1]

    def critic_loss(
        self, x_g: Tensor, x_real: Tensor, sigma: Tensor, noise: Tensor, noise_real: Tensor, cond: Conditioning,
        level: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Fake-score flow-matching loss on detached student samples + discriminator loss.

        ``x_t = add_noise(x_g, noise, sigma)`` (``x_g`` at ``level``: diffused from there,
        and the fake score's target is the subinterval one); the real clip is noised to the
        same sigma with its own noise. Fake and real go through the feature network in one
        batch. With every GAN weight 0 (``critic_gan_weight`` and ``gan_weight``) the
        discriminator is not used: no features, no real clip through a network, the loss is the
        fake score's alone (the discriminator gets no gradient). Returns (loss, logs).
        """
        x_g = x_g.detach()
        b = x_g.shape[0]
        x_t = self._noised(x_g, level, sigma, noise)
        use_discriminator = self.critic_gan_weight != 0 or self.gan_weight != 0
        if use_discriminator:
            x_t_real = add_noise(x_real, noise_real, sigma)
            both = Conditioning.cat([cond, cond])
        if not use_discriminator:
            v_fake = self.fake_score(x_t, sigma, cond)
        elif self.discriminator_on == "fake_score":
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
        fake_score_loss = self._fake_score_loss(v_fake, x_g, x_t, sigma, noise, level)
        if not use_discriminator:
            return fake_score_loss, {"critic_loss": fake_score_loss, "fake_score_loss": fake_score_loss}
        logits = self.discriminator(features)
        logits_fake, logits_real = logits[:b], logits[b:]
        discriminator_loss = gan_discriminator_loss(logits_real, logits_fake)
        loss = fake_score_loss + self.critic_gan_weight * discriminator_loss
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

    @staticmethod
    def _fake_score_loss(v_fake: Tensor, x_g: Tensor, x_t: Tensor, sigma: Tensor, noise: Tensor,
                         level: Tensor | None) -> Tensor:
        """The fake score's flow-matching loss, given its velocity ``v_fake`` at ``x_t`` (``x_g``
        diffused to ``sigma`` with ``noise``; at ``level``: the subinterval target)."""
        if level is None:
            return torch.mean((v_fake.float() - velocity(x_g, noise).float()) ** 2)
        target, weight = subinterval_flow_target(x_t.float(), sigma.float(), x_g.float(), level.float())
        per_sample = (v_fake.float() - target).square().flatten(1).mean(dim=1)
        return (weight * per_sample).mean()

    @torch.no_grad()
    def _teacher_x0(self, x_t: Tensor, sigma: Tensor, cond: Conditioning,
                    uncond: Conditioning | None) -> tuple[Tensor, Tensor]:
        """(x0_cond, x0_uncond): the teacher's clean estimates of its two CFG branches at
        ``(x_t, sigma)``, in one batched call; at guidance 1 both are the conditional one (no
        unconditional pass)."""
        if self.guidance == 1:
            x0_cond = x0_from_velocity(x_t, sigma, self.teacher(x_t, sigma, cond))
            return x0_cond, x0_cond
        v_cond, v_uncond = branch_velocities(self.teacher, cond, uncond)(x_t, sigma)
        return x0_from_velocity(x_t, sigma, v_cond), x0_from_velocity(x_t, sigma, v_uncond)

    def generator_loss(
        self, x_g: Tensor, sigma: Tensor, noise: Tensor, cond: Conditioning, uncond: Conditioning | None,
        level: Tensor | None = None, x0: Tensor | None = None,
        sigma_dm: Tensor | None = None, noise_dm: Tensor | None = None,
        sigma_ca: Tensor | None = None, noise_ca: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_G = L_DMD + gan_weight * softplus(-D(features of x_t)))``.

        ``x0_real``: teacher with CFG ``w`` at ``(x_t, sigma)``; ``x0_fake``: fake score
        without CFG; both without gradient (at ``w = 1``, ``u + 1 (c - u) = c``: no
        unconditional pass, ``uncond`` may be None; other ``w`` need it). The GAN term's gradient flows through the
        (not updated) feature network and head into ``x_g``. ``x_g`` at ``level`` (Phased
        DMD): ``x_t`` is diffused from there and the normaliser uses its clean estimate
        ``x0``. Decoupled DMD's own schedule: ``sigma_dm`` / ``sigma_ca`` [B] and ``noise_dm`` /
        ``noise_ca`` (shape of ``x_g``) place its DM and CA terms (None: ``sigma``, ``noise``);
        the GAN term stays at ``(sigma, noise)``. Returns (loss, logs) (module docstring).
        """
        x_t = self._noised(x_g, level, sigma, noise)
        s_dm, n_dm = (sigma, noise) if sigma_dm is None else (sigma_dm, noise_dm)
        x_t_dm = (x_t if sigma_dm is None else self._noised(x_g, level, s_dm, n_dm)).detach()
        with torch.no_grad():
            if self.decoupled:
                x0_cond, x0_uncond = self._teacher_x0(x_t_dm, s_dm, cond, uncond)
                x0_real = classifier_free_guidance(x0_uncond, x0_cond, self.guidance)
                if sigma_ca is None:
                    x0_cond_ca, x0_uncond_ca, x0_real_ca = x0_cond, x0_uncond, x0_real
                else:
                    x0_cond_ca, x0_uncond_ca = self._teacher_x0(self._noised(x_g, level, sigma_ca, noise_ca),
                                                                sigma_ca, cond, uncond)
                    x0_real_ca = classifier_free_guidance(x0_uncond_ca, x0_cond_ca, self.guidance)
            else:
                teacher = velocity_fn(self.teacher, cond, uncond, self.guidance, self.guidance_2)
                x0_real = x0_from_velocity(x_t_dm, s_dm, teacher(x_t_dm, s_dm))
        use_gan = self.gan_weight != 0
        if use_gan:
            v_fake, features = self._features_for_discriminator(x_t, sigma, cond)
        if not use_gan or v_fake is None or sigma_dm is not None:
            with torch.no_grad():
                v_fake = self.fake_score(x_t_dm, s_dm, cond)
        v_fake = v_fake.detach()  # frees the part of the fake score's graph the GAN term does not need
        x0_fake = x0_from_velocity(x_t_dm, s_dm, v_fake)

        reference = x_g if level is None else x0
        normaliser = dmd_normaliser(reference, x0_real)
        if self.decoupled:
            dm, ca = decoupled_dmd_terms(x0_fake, x0_cond, normaliser, x0_cond_ca, x0_uncond_ca,
                                         dmd_normaliser(reference, x0_real_ca), self.guidance)
            grad = self.dm_weight * dm + self.ca_weight * ca
        else:
            grad = dmd_gradient(x0_fake, x0_real, normaliser)
        loss_dmd = dmd_loss(x_g, grad)
        logs = {
            "dmd_loss": loss_dmd,
            "dmd_normaliser": normaliser.mean(),
            "dmd_grad_norm": per_sample_norm(grad).mean(),
            "teacher_fake_x0_gap": (x0_real.float() - x0_fake.float()).abs().mean(),
            "fake_score_loss_fresh": self._fake_score_loss(v_fake, x_g.detach(), x_t_dm, s_dm, n_dm, level),
        }
        if self.decoupled:
            logs.update(dmd_dm_norm=per_sample_norm(dm).mean(), dmd_ca_norm=per_sample_norm(ca).mean())
        loss = loss_dmd
        if use_gan:
            logits_fake = self.discriminator(features)
            loss_gan = gan_generator_loss(logits_fake)
            loss = loss + self.gan_weight * loss_gan
            logs.update(gan_loss=loss_gan, generator_logits_fake=logits_fake.mean())
        logs["generator_loss"] = loss
        return loss, logs


def shared_fake_score(network: Denoiser) -> Denoiser:
    """The fake score that serves every noise level as one network, for a two-expert teacher
    (``fake_score_experts: shared``): the low-noise expert (the last of
    :attr:`~distill_pl.models.denoiser.Denoiser.named_experts`) of ``network``, the
    two-expert fake score as built (a trainable copy of the teacher), standing alone as a
    denoiser of one network.

    Why the low-noise one: a fake score starts as the teacher, so that the DMD gradient starts
    from the student's gap alone; the low-noise expert IS the teacher at every level below the
    experts' boundary, and the critic and the DMD term draw most of their levels there
    (``sigma = shift(t)``, ``t ~ U[0.02, 0.98]``, is below Wan 2.2 T2V-A14B's boundary 0.875
    for ``t < 0.875 / (shift - (shift - 1) 0.875)``: 71% of the draws at Wan's default shift 3,
    59% at shift 5). Above the boundary it starts off the teacher and learns those levels from
    the student's samples as it learns every level. (Above a shift of 7 most draws lie above
    the boundary, where a copy of the high-noise expert would start closer.)
    """
    return list(network.named_experts.values())[-1]


class DMD2Roles(Roles):
    """DMD2's networks (see the module docstring): ``student`` (float32, or with
    ``student_lora_rank`` its initial weights frozen in ``teacher_dtype`` with float32 LoRA
    adapters), ``teacher`` (frozen,
    eval mode, in ``teacher_dtype``, no gradient checkpointing), ``fake_score`` (a float32
    copy of the teacher, or with ``fake_score_lora_rank`` the teacher's weights frozen in
    ``teacher_dtype`` with float32 LoRA adapters), ``discriminator`` (a
    :class:`~distill_pl.models.discriminator.DiscriminatorHead` on block ``feature_block``'s
    features) and ``student_ema`` (an EMA of the student, or None). The critic phase trains
    the fake score (its adapters only, with LoRA) and the discriminator, the generator phase
    the student (its adapters only, with LoRA). A two-expert teacher's fake score is a
    two-expert copy (one fake score per expert, ``fake_score_experts: per_expert``) or one
    expert's copy serving every level (``shared``: :func:`shared_fake_score`)."""

    phases = {"critic": ("fake_score", "discriminator"), "generator": ("student",)}

    def __init__(self, student: Denoiser, teacher: Denoiser, fake_score: Denoiser, discriminator: DiscriminatorHead,
                 student_ema: EMA | None, feature_block: int, dtypes: dict[str, str]) -> None:
        super().__init__(dtypes)
        self.student = student
        self.teacher = teacher
        self.fake_score = fake_score
        self.discriminator = discriminator
        self.student_ema = student_ema
        self.feature_block = feature_block

    @classmethod
    def from_settings(
        cls,
        settings: Mapping,
        make: DenoiserFactory,
        compute_dtype: str | None = None,
        initialise_student: Callable[[Denoiser], object] | None = None,
    ) -> "DMD2Roles":
        """The roles on the current device from DMD2's settings (``DMD2Module``'s arguments by
        name; read: ``teacher_dtype``, ``gradient_checkpointing``, ``fake_score_experts``
        (where given; default ``per_expert``), ``fake_score_lora_rank``,
        ``fake_score_lora_alpha``, ``fake_score_lora_targets``, ``student_lora_rank``,
        ``student_lora_alpha``, ``student_lora_targets``, ``feature_block`` (None: the
        middle block), ``discriminator_hidden``, ``ema_decay``, ``seed``).

        The fake score is made once in float32; student and (float32) teacher are its copies,
        a teacher in another dtype is made in it. A LoRA fake score's base is that float32
        network or, in another ``teacher_dtype``, a copy of the teacher; its adapters are
        drawn from ``seed``, and so is the discriminator head's initialisation (the
        global RNG is left as it was). A LoRA student's base is likewise the float32 copy or
        a copy of the teacher; ``initialise_student(student)`` (e.g. loading ``init_from``)
        gives it its weights, then its adapters are added, drawn from ``seed + 1``; then the
        EMA (if any) copies the student. With ``fake_score_experts: shared`` the fake score is
        :func:`shared_fake_score` of that network (before any adapters). ``compute_dtype``: see
        :func:`~distill_pl.methods.roles.build_dtype`. ValueError for a ``feature_block``
        outside the teacher's blocks, an unknown ``fake_score_experts``, and ``shared`` with
        a teacher of one network.
        """
        teacher_dtype, checkpointing = settings["teacher_dtype"], settings["gradient_checkpointing"]
        lora_rank, student_rank, seed = settings["fake_score_lora_rank"], settings["student_lora_rank"], settings["seed"]
        experts = settings.get("fake_score_experts", "per_expert")
        if experts not in FAKE_SCORE_EXPERTS:
            raise ValueError(f"model.init_args.fake_score_experts={experts!r}: must be 'per_expert' or 'shared'")
        fake_score = make(build_dtype("float32", compute_dtype), checkpointing)
        if experts == "shared" and not fake_score.named_experts:
            raise ValueError(f"model.init_args.fake_score_experts='shared': a fake score shared by the experts needs "
                             f"a two-expert teacher (a folder with transformer_2/ and boundary_ratio); "
                             f"{type(fake_score).__name__} is one network: use 'per_expert' (the default)")
        lora_base = student_rank is not None and teacher_dtype != "float32"
        if not lora_base:
            student = copy.deepcopy(fake_score)
        if teacher_dtype == "float32":
            teacher = copy.deepcopy(fake_score)
        else:
            teacher = make(build_dtype(teacher_dtype, compute_dtype), False)
        teacher.set_gradient_checkpointing(False)
        teacher.eval().requires_grad_(False)

        def trainable_copy_of_teacher() -> Denoiser:
            copied = copy.deepcopy(teacher).train()
            copied.set_gradient_checkpointing(checkpointing)
            return copied

        if lora_rank is not None and teacher_dtype != "float32":  # a LoRA fake score's base: the teacher's dtype
            fake_score = trainable_copy_of_teacher()
        if experts == "shared":
            fake_score = shared_fake_score(fake_score)
        if lora_rank is not None:  # frozen base + LoRA adapters
            add_lora(fake_score, lora_rank, settings["fake_score_lora_alpha"], settings["fake_score_lora_targets"],
                     seed=seed)
        if lora_base:  # the LoRA student's base in the teacher's dtype
            student = trainable_copy_of_teacher()
        if initialise_student is not None:
            initialise_student(student)
        if student_rank is not None:  # adapters on the initialised weights
            add_lora(student, student_rank, settings["student_lora_alpha"], settings["student_lora_targets"],
                     seed=seed + 1)

        blocks = teacher.num_blocks
        feature_block = blocks // 2 if settings["feature_block"] is None else settings["feature_block"]
        if not 0 <= feature_block < blocks:
            raise ValueError(f"feature_block={settings['feature_block']}: valid blocks are 0..{blocks - 1}")
        with torch.random.fork_rng(devices=[]):  # the head's init depends on `seed` only
            torch.manual_seed(seed)
            discriminator = DiscriminatorHead(teacher.feature_dim, settings["discriminator_hidden"])
        head_dtype = build_dtype("float32", compute_dtype)
        if head_dtype != "float32":
            discriminator = discriminator.to(getattr(torch, head_dtype))
        ema = EMA(student, settings["ema_decay"]) if settings["ema_decay"] is not None else None
        dtypes = {"student": "float32" if student_rank is None else teacher_dtype, "teacher": teacher_dtype,
                  "fake_score": "float32" if lora_rank is None else teacher_dtype,
                  "discriminator": "float32", "student_ema": "float32"}
        return cls(student, teacher, fake_score, discriminator, ema, feature_block, dtypes)

    def phase_losses(self, settings: Mapping, latents: Callable[[], Tensor], sigma: Tensor,
                     cond: Conditioning) -> dict[str, Callable[[], Tensor]]:
        """Phase -> its loss on given inputs, for measuring a step (the objective of
        :func:`dmd2_objective`, one student step): the critic loss of the student's sample
        ``x_g`` and a real clip, the generator loss of the student's sample from ``eps``;
        ``latents()`` gives each a new [B, C, T, H, W] tensor, ``sigma`` [B] the noise level.
        The conditioning doubles as the unconditional one."""
        objective = dmd2_objective(self, settings)
        eps, x_g = latents(), latents()
        return {
            "critic": lambda: objective.critic_loss(x_g, latents(), sigma, eps, latents(), cond),
            "generator": lambda: objective.generator_loss(objective.generate(eps, cond), sigma, latents(), cond, cond),
        }


#: DMD2Objective's Decoupled DMD fields -> DMD2Module's setting names
DECOUPLED_SETTINGS = {"decoupled": "decoupled_dmd", "dm_weight": "dm_weight", "ca_weight": "ca_weight",
                      "dm_t_min": "dm_t_min", "dm_t_max": "dm_t_max", "ca_t_min": "ca_t_min", "ca_t_max": "ca_t_max"}


def dmd2_objective(networks, settings: Mapping, student_sigmas: tuple[float, ...] = (1.0,),
                   shift: float = 1.0, conditional_frame_probabilities: tuple[float, ...] = (),
                   phase_boundaries: tuple[float, ...] | None = None) -> DMD2Objective:
    """The :class:`DMD2Objective` over ``networks`` (anything holding ``student``, ``teacher``,
    ``fake_score``, ``discriminator`` and ``feature_block`` as attributes: a
    :class:`DMD2Roles`, or the stage module that took them over) with DMD2's loss settings
    (``DMD2Module``'s arguments by name: ``guidance``, ``gan_weight``, ``critic_gan_weight``,
    ``discriminator_on``, ``trained_step_input``, ``phased_dmd``, ``t_min``, ``t_max``; the
    Decoupled DMD ones, ``decoupled_dmd``, ``dm_weight``, ``ca_weight``, ``dm_t_min/max``,
    ``ca_t_min/max``, where given; ``guidance_2``, where given), the student's noise levels
    (already shifted), the teacher's timestep shift, how often conditional frames are drawn and
    the Phased DMD phase boundaries (members of ``student_sigmas``; None: one phase per step)."""
    decoupled = {field: settings[name] for field, name in DECOUPLED_SETTINGS.items() if name in settings}
    return DMD2Objective(
        student=networks.student, teacher=networks.teacher, fake_score=networks.fake_score,
        discriminator=networks.discriminator, feature_block=networks.feature_block,
        guidance=settings["guidance"], gan_weight=settings["gan_weight"],
        critic_gan_weight=settings["critic_gan_weight"], discriminator_on=settings["discriminator_on"],
        student_sigmas=student_sigmas, trained_step_input=settings["trained_step_input"],
        phased=settings["phased_dmd"], phase_boundaries=phase_boundaries, shift=shift, t_min=settings["t_min"],
        t_max=settings["t_max"], **decoupled,
        conditional_frame_probabilities=tuple(conditional_frame_probabilities),
        guidance_2=settings.get("guidance_2"),
    )

