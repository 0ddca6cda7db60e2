import pytest
import torch

from distill_pl.diffusion.losses import flow_matching_loss, sample_training_sigma
from tests.gaussian_flow import exact_velocity, irreducible_fm_loss


def test_fm_loss_zero_for_exact_velocity_of_point_mass():
    # x0 ~ N(mu, 0): the exact velocity (x_t - mu) / sigma makes the loss exactly zero
    mu = 0.7
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((64, 8), mu, dtype=torch.float64)
    eps = torch.randn(64, 8, generator=g, dtype=torch.float64)
    sigma = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    loss = flow_matching_loss(lambda x, s: exact_velocity(x, s, mu, 0.0), x0, eps, sigma)
    assert loss.item() < 1e-20


@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.9])
def test_fm_loss_of_exact_velocity_equals_conditional_variance(sigma):
    mu, s = 1.0, 0.5
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    sig = torch.full((n,), sigma, dtype=torch.float64)
    exact = flow_matching_loss(lambda x, t: exact_velocity(x, t, mu, s), x0, eps, sig)
    assert exact.item() == pytest.approx(irreducible_fm_loss(sigma, s), rel=1e-2)
    # any other predictor does worse: the exact velocity is the minimiser
    off = flow_matching_loss(lambda x, t: exact_velocity(x, t, mu, s) + 0.1, x0, eps, sig)
    assert off.item() == pytest.approx(exact.item() + 0.01, rel=1e-2)


def test_training_sigma_range_and_shift():
    g = torch.Generator().manual_seed(0)
    s = sample_training_sigma(10_000, shift=1.0, t_min=0.02, t_max=0.98, generator=g)
    assert s.min() >= 0.02 and s.max() <= 0.98
    assert s.mean().item() == pytest.approx(0.5, abs=0.02)
    shifted = sample_training_sigma(10_000, shift=3.0, generator=torch.Generator().manual_seed(0))
    # E[3t / (1 + 2t)] for t ~ U[0, 1] = 1.5 - 0.75 ln 3
    assert shifted.mean().item() == pytest.approx(1.5 - 0.75 * torch.log(torch.tensor(3.0)).item(), abs=0.01)
