"""Distribution matching distillation (DMD / DMD2) losses as pure functions of tensors.

Notation (rectified flow, ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity
``v = eps - x0``): a student sample ``x_g`` is noised to
``x_t = (1 - sigma) x_g + sigma n``; the teacher ("real" score, with CFG) and the fake score
network predict velocities at ``(x_t, sigma)``, converted to clean estimates
``x0 = x_t - sigma v`` (``x0_real`` and ``x0_fake``).

Relation to the KL gradient. For rectified flow the score of the noised distribution is
``s(x_t) = -(x_t - (1 - sigma) x0_hat) / sigma^2`` (Tweedie), so

    s_fake(x_t) - s_real(x_t) = (1 - sigma) / sigma^2 * (x0_fake - x0_real),

and with ``dx_t / dx_g = (1 - sigma)`` the gradient of the noised KL divergence is

    d/dtheta KL(p_fake,sigma || p_real,sigma)
        = E[(1 - sigma)^2 / sigma^2 * (x0_fake - x0_real) . dx_g/dtheta].

:func:`dmd_gradient` is ``(x0_fake - x0_real) / k`` with the per-sample normaliser ``k`` of
:func:`dmd_normaliser`: the same direction per sample, with DMD's weighting
``sigma^2 / ((1 - sigma)^2 k)`` in place of the factor above. Gradient DESCENT on
:func:`dmd_loss` moves ``x_g`` by ``-grad``, toward ``x0_real`` and away from ``x0_fake``:
it descends ``KL(p_fake || p_real)``.

Decoupled DMD. With the teacher's CFG clean estimate ``x0_cfg = x0_u + w (x0_c - x0_u)``
(``x0_c`` / ``x0_u``: its conditional / unconditional clean estimates, guidance ``w`` in
``u + w (c - u)``) the difference the DMD gradient follows splits into two terms,

    x0_cfg - x0_fake = (x0_c - x0_fake)  +  (w - 1) (x0_c - x0_u),
                       distribution matching (DM)   CFG augmentation (CA)

(the score form: ``-(s_c^real - s_c^fake)`` and ``(w - 1) (s_c^real - s_u^real)``).
:func:`decoupled_dmd_terms` gives both as normalised gradients (each with its own ``k``):
``dm = (x0_fake - x0_c) / k_dm`` and ``ca = (w - 1) (x0_u - x0_c) / k_ca``; with both
evaluated at one ``x_t`` and ``k_dm = k_ca = k``, ``dm + ca`` is :func:`dmd_gradient`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: lower clamp of the per-sample normaliser (keeps the division finite when x_g == x0_real)
NORMALISER_MIN = 1e-6


def _per_sample(k: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against ``like``."""
    return k.reshape(k.shape[0], *([1] * (like.ndim - 1)))


def dmd_normaliser(x_g: Tensor, x0_real: Tensor, min_value: float = NORMALISER_MIN) -> Tensor:
    """Per-sample ``k = mean |x_g - x0_real|`` over all non-batch dims, in float32.

    x_g, x0_real: [B, ...]. Returns k [B] float32, clamped to at least ``min_value``.
    No gradient flows through it (both inputs are detached).
    """
    diff = (x_g.detach().float() - x0_real.detach().float()).abs()
    return diff.flatten(1).mean(dim=1).clamp_min(min_value)


def dmd_gradient(x0_fake: Tensor, x0_real: Tensor, normaliser: Tensor) -> Tensor:
    """The normalised DMD gradient ``(x0_fake - x0_real) / k``, float32, shape of ``x0_fake``.

    ``normaliser`` is ``k`` [B] (see :func:`dmd_normaliser`). Positive where the fake score's
    clean estimate overshoots the teacher's: the student sample must move the other way.
    """
    diff = x0_fake.detach().float() - x0_real.detach().float()
    return diff / _per_sample(normaliser.float(), diff)


def decoupled_dmd_terms(
    x0_fake: Tensor, x0_cond_dm: Tensor, normaliser_dm: Tensor,
    x0_cond_ca: Tensor, x0_uncond_ca: Tensor, normaliser_ca: Tensor, guidance: float,
) -> tuple[Tensor, Tensor]:
    """The two normalised terms of Decoupled DMD (see the module docstring), float32, [B, ...].

    DM: ``(x0_fake - x0_cond_dm) / k_dm`` from the fake score's and the teacher's conditional
    clean estimates at the DM term's ``x_t``; CA: ``(guidance - 1) (x0_uncond_ca - x0_cond_ca)
    / k_ca`` from the teacher's two clean estimates at the CA term's ``x_t`` (zero at
    ``guidance = 1``). ``normaliser_*``: ``k`` [B] of each term (:func:`dmd_normaliser`).
    Returns (dm, ca); the gradient of Decoupled DMD is ``dm_weight * dm + ca_weight * ca``.
    """
    dm = dmd_gradient(x0_fake, x0_cond_dm, normaliser_dm)
    ca = (guidance - 1.0) * dmd_gradient(x0_uncond_ca, x0_cond_ca, normaliser_ca)
    return dm, ca


def per_sample_norm(x: Tensor) -> Tensor:
    """The L2 norm of each sample over its non-batch dims: [B, ...] -> [B] float32."""
    return x.detach().float().flatten(1).norm(dim=1)


def dmd_loss(x_g: Tensor, grad: Tensor) -> Tensor:
    """``L_DMD = 0.5 * mean((x_g - stopgrad(x_g - grad))^2)`` (float32 scalar).

    Its gradient with respect to ``x_g`` is exactly ``grad / x_g.numel()``, so backprop
    carries the DMD gradient into the generator; its value is ``0.5 * mean(grad^2)``.
    """
    x = x_g.float()
    target = (x - grad.float()).detach()
    return 0.5 * torch.mean((x - target) ** 2)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean(softplus(-D(fake)))`` (= -log sigmoid(D))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss ``mean(softplus(D(fake))) + mean(softplus(-D(real)))``
    (binary cross-entropy with real = 1, fake = 0)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
