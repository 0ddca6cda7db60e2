"""DMD losses against closed forms of rectified flow for Gaussian data (tests/gaussian_flow.py).

Real data N(mu_r, s_r^2); generator x_g = mu_f + s_f z (so p_fake = N(mu_f, s_f^2)); with
the exact x0 predictors of both, the noised KL between two Gaussians has a closed-form
gradient in (mu_f, s_f) to compare the DMD gradient with.
"""

import math

import pytest
import torch

from distill_pl.diffusion.dmd import (
    dmd_gradient,
    dmd_loss,
    dmd_normaliser,
    gan_discriminator_loss,
    gan_generator_loss,
)
from distill_pl.diffusion.flow import add_noise, classifier_free_guidance, x0_from_velocity
from distill_pl.diffusion.losses import flow_matching_loss
from tests.gaussian_flow import exact_velocity, marginal_var


def exact_x0(x_t, sigma, mu, s):
    """E[x0 | x_sigma] for data N(mu, s^2)."""
    return x0_from_velocity(x_t, sigma, exact_velocity(x_t, sigma, mu, s))


def noised_kl_gradient(mu_f, s_f, mu_r, s_r, sigma):
    """d/d(mu_f, s_f) of KL(N((1-sg) mu_f, v_f) || N((1-sg) mu_r, v_r)) per element."""
    v_f, v_r = marginal_var(sigma, s_f), marginal_var(sigma, s_r)
    d_mu = (1 - sigma) ** 2 * (mu_f - mu_r) / v_r
    d_s = (1 - sigma) ** 2 * s_f * (1 / v_r - 1 / v_f)
    return torch.tensor([d_mu, d_s], dtype=torch.float64)


def antithetic_normal(shape, seed):
    g = torch.Generator().manual_seed(seed)
    half = torch.randn((shape[0] // 2, *shape[1:]), generator=g, dtype=torch.float64)
    return torch.cat([half, -half])


def dmd_parameter_gradient(mu_f, s_f, x0_real_fn, sigma, shape, normalise, seed=0):
    """Autograd gradient of dmd_loss w.r.t. (mu_f, s_f): the mean over elements of
    grad * dx_g/dtheta, a Monte-Carlo estimate of E[grad dx_g/dtheta] (antithetic draws)."""
    mu = torch.tensor(mu_f, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(s_f, dtype=torch.float64, requires_grad=True)
    z = antithetic_normal(shape, seed)
    n = antithetic_normal(shape, seed + 1)
    x_g = mu + s * z
    sg = torch.full((shape[0],), sigma, dtype=torch.float64)
    x_t = add_noise(x_g.detach(), n, sg)
    x0_real = x0_real_fn(x_t, sg)
    x0_fake = exact_x0(x_t, sg, mu_f, s_f)
    k = dmd_normaliser(x_g, x0_real) if normalise else torch.ones(shape[0])
    loss = dmd_loss(x_g, dmd_gradient(x0_fake, x0_real, k))
    loss.backward()
    return torch.stack([mu.grad, s.grad]), k


def test_dmd_loss_gradient_is_grad_over_numel_and_value_is_half_mean_square():
    x_g = torch.randn(3, 2, 4, 5, requires_grad=True)
    grad = torch.randn(3, 2, 4, 5)
    loss = dmd_loss(x_g, grad)
    loss.backward()
    torch.testing.assert_close(x_g.grad, grad / grad.numel())
    torch.testing.assert_close(loss, 0.5 * grad.pow(2).mean())


def test_normaliser_is_per_sample_fp32_and_clamped():
    x_g = torch.zeros(3, 2, 4, dtype=torch.bfloat16)
    x0_real = torch.stack([torch.full((2, 4), 2.0), -torch.ones(2, 4), torch.zeros(2, 4)]).bfloat16()
    k = dmd_normaliser(x_g, x0_real)
    assert k.dtype == torch.float32 and k.shape == (3,)
    assert k[0] == 2.0 and k[1] == 1.0 and 0 < k[2] <= 1e-6
    grad = dmd_gradient(torch.zeros(3, 2, 4), x0_real.float(), k)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad[0], -torch.ones(2, 4))  # (x0_fake - x0_real) / k
    torch.testing.assert_close(grad[1], torch.ones(2, 4))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("sigma", [0.25, 0.6, 0.9])
def test_dmd_gradient_equals_noised_kl_gradient_up_to_weighting(sigma):
    """Without the normaliser, E[grad dx_g/dtheta] = sigma^2/(1-sigma)^2 dKL/dtheta exactly."""
    mu_r, s_r, mu_f, s_f = 1.0, 0.5, -0.5, 1.5
    real = lambda x_t, sg: exact_x0(x_t, sg, mu_r, s_r)  # noqa: E731
    got, _ = dmd_parameter_gradient(mu_f, s_f, real, sigma, (1 << 18, 1), normalise=False)
    expected = sigma**2 / (1 - sigma) ** 2 * noised_kl_gradient(mu_f, s_f, mu_r, s_r, sigma)
    # signs: mu_f < mu_r and s_f > s_r, so descent must raise the mean and lower the spread
    assert got[0] < 0 < got[1]
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)


def test_normalised_dmd_gradient_has_kl_direction_and_magnitude_over_k():
    sigma, mu_r, s_r, mu_f, s_f = 0.5, 0.3, 0.8, 1.2, 0.4
    real = lambda x_t, sg: exact_x0(x_t, sg, mu_r, s_r)  # noqa: E731
    got, k = dmd_parameter_gradient(mu_f, s_f, real, sigma, (64, 4096), normalise=True)
    expected = sigma**2 / (1 - sigma) ** 2 * noised_kl_gradient(mu_f, s_f, mu_r, s_r, sigma)
    assert k.std() / k.mean() < 0.05  # per-sample normalisers of iid samples nearly equal
    cosine = torch.dot(got, expected) / (got.norm() * expected.norm())
    assert cosine > 0.999
    torch.testing.assert_close(got * k.mean().double(), expected, rtol=2e-2, atol=1e-3)


def test_cfg_teacher_target_is_common_form():
    """Teacher = CFG of cond N(mu_c, s^2) and uncond N(mu_u, s^2) with w: the guided x0 is
    that of N(mu_u + w (mu_c - mu_u), s^2) (u + w(c - u)), not of N(mu_c + w (mu_c - mu_u))."""
    mu_c, mu_u, s, w, sigma = 0.25, -0.5, 0.6, 3.0, 0.4
    x_t = torch.linspace(-3, 3, 101, dtype=torch.float64)[:, None]
    sg = torch.full((101,), sigma, dtype=torch.float64)
    guided_v = classifier_free_guidance(
        exact_velocity(x_t, sg, mu_u, s), exact_velocity(x_t, sg, mu_c, s), w
    )
    guided_x0 = x0_from_velocity(x_t, sg, guided_v)
    common = exact_x0(x_t, sg, mu_u + w * (mu_c - mu_u), s)
    cosmos = exact_x0(x_t, sg, mu_c + w * (mu_c - mu_u), s)
    torch.testing.assert_close(guided_x0, common)
    assert (guided_x0 - cosmos).abs().min() > 0.1

    # and the DMD gradient with this teacher descends the KL to the common-form Gaussian
    mu_f, s_f = 0.0, 0.6
    teacher = lambda x, sg_: x0_from_velocity(  # noqa: E731
        x, sg_, classifier_free_guidance(exact_velocity(x, sg_, mu_u, s), exact_velocity(x, sg_, mu_c, s), w)
    )
    got, _ = dmd_parameter_gradient(mu_f, s_f, teacher, sigma, (1 << 16, 1), normalise=False)
    target_mean = mu_u + w * (mu_c - mu_u)  # 1.75 > mu_f: descent raises the mean
    expected = sigma**2 / (1 - sigma) ** 2 * noised_kl_gradient(mu_f, s_f, target_mean, s, sigma)
    assert got[0] < 0
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)


def test_gan_losses_closed_forms():
    logits_real = torch.tensor([2.0, 0.0])
    logits_fake = torch.tensor([-1.0, 3.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert gan_generator_loss(logits_fake).item() == pytest.approx((sp(1.0) + sp(-3.0)) / 2)
    expected = (sp(-1.0) + sp(3.0)) / 2 + (sp(-2.0) + sp(0.0)) / 2
    assert gan_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(expected)
    # a perfect discriminator has loss -> 0, a fooled one a large loss
    assert gan_discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])) < 1e-6


class GaussianScore(torch.nn.Module):
    """A learnable fake score: the exact velocity of N(m, exp(log_s)^2)."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor(m))
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(s)))

    def forward(self, x_t, sigma):
        return exact_velocity(x_t, sigma, self.m, self.log_s.exp())


def test_toy_dmd_with_learned_fake_score_moves_generator_to_teacher():
    """1-D generator x_g = a eps + b, starting off target; fake score learned by flow matching
    in the 4:1 alternation; teacher exact N(1.5, 0.5^2). 100 generator steps suffice."""
    torch.manual_seed(0)
    mu_r, s_r = 1.5, 0.5
    a = torch.nn.Parameter(torch.tensor(2.0))
    b = torch.nn.Parameter(torch.tensor(-0.5))
    fake = GaussianScore(-0.5, 2.0)  # fake score initialised at the generator's distribution
    opt_g = torch.optim.Adam([a, b], lr=0.03)
    opt_f = torch.optim.Adam(fake.parameters(), lr=0.05)
    batch, dim = 16, 64
    for step in range(500):
        eps = torch.randn(batch, dim)
        sigma = 0.02 + 0.96 * torch.rand(batch)
        noise = torch.randn(batch, dim)
        x_g = a * eps + b
        if step % 5 < 4:  # critic
            loss = flow_matching_loss(fake, x_g.detach(), noise, sigma)
            opt_f.zero_grad()
            loss.backward()
            opt_f.step()
        else:
            x_t = add_noise(x_g.detach(), noise, sigma)
            with torch.no_grad():
                x0_real = exact_x0(x_t, sigma, mu_r, s_r)
                x0_fake = x0_from_velocity(x_t, sigma, fake(x_t, sigma))
            k = dmd_normaliser(x_g, x0_real)
            loss = dmd_loss(x_g, dmd_gradient(x0_fake, x0_real, k))
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
    assert b.item() == pytest.approx(mu_r, abs=0.1)
    assert abs(a.item()) == pytest.approx(s_r, abs=0.1)
