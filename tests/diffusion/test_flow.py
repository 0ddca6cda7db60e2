import math

import pytest
import torch

from distill_pl.diffusion import flow
from tests.gaussian_flow import exact_score, exact_velocity


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 5, 5, generator=g)
    eps = torch.randn(4, 3, 2, 5, 5, generator=g)
    sigma = torch.tensor([0.1, 0.4, 0.7, 1.0])
    x_t = flow.add_noise(x0, eps, sigma)
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, sigma, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, sigma, v), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, sigma, x0), v)


def test_add_noise_endpoints():
    x0, eps = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.ones(2)), eps)
    torch.testing.assert_close(flow.add_noise(x0, eps, 0.25), torch.full((2, 3), 1.25))


@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (1.5, 0.3), (-2.0, 2.0)])
def test_score_from_exact_velocity_matches_gaussian_score(mu, s):
    x_t = torch.linspace(-4, 4, 50).reshape(5, 10).double()
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99]).double()
    v = exact_velocity(x_t, sigma, mu, s)
    torch.testing.assert_close(flow.score_from_velocity(x_t, sigma, v), exact_score(x_t, sigma, mu, s))


def test_shift_closed_form():
    assert flow.shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_sigma(0.0, 5.0) == 0.0
    assert flow.shift_sigma(1.0, 5.0) == pytest.approx(1.0)
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(flow.shift_sigma(t, 1.0), t)
    shifted = flow.shift_sigma(t, 3.0)
    assert torch.all(shifted[1:-1] > t[1:-1]) and torch.all(torch.diff(shifted) > 0)
    # inverse: t = s / (shift - (shift - 1) s)
    torch.testing.assert_close(shifted / (3.0 - 2.0 * shifted), t)


def test_cfg_common_form_differs_from_cosmos_form():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.classifier_free_guidance(u, c, 1.0).item() == 3.0  # w = 1: conditional
    assert flow.classifier_free_guidance(u, c, 0.0).item() == 1.0  # w = 0: unconditional
    g = 7.0
    cosmos = c + g * (c - u)  # 17
    assert flow.classifier_free_guidance(u, c, g).item() == 15.0  # the two forms differ
    assert flow.classifier_free_guidance(u, c, flow.cosmos_guidance_to_w(g)).item() == cosmos.item()


def test_expand_like_scalar_and_batch():
    x = torch.zeros(3, 2, 4)
    assert flow.expand_like(torch.ones(3), x).shape == (3, 1, 1)
    assert flow.expand_like(0.5, x).ndim == 0
    assert math.isclose(float(flow.expand_like(0.5, x)), 0.5)
