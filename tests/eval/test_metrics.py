"""The report's metrics on inputs whose answer is known in closed form."""

import math

import pytest
import torch

from distill_pl.eval import metrics


def test_psnr_of_a_known_error_and_of_identical_videos():
    target = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    offset = target + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1, 1)  # MSE 0.01 and 0.04
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    assert metrics.psnr_per_video(offset, target).tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.isinf(metrics.psnr_per_video(target, target)).all()


def test_ssim_of_constant_videos_is_the_luminance_term():
    # constant frames a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 2)^2
    a, b = 0.5, 0.3
    pred = torch.full((1, 3, 2, 16, 16), a)
    target = torch.full((1, 3, 2, 16, 16), b)
    c1 = (0.01 * 2) ** 2
    assert metrics.ssim_per_video(pred, target).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)
    noise = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    assert metrics.ssim_per_video(noise, noise).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def _vertical_line(x: int, size: int = 16, frames: int = 2) -> torch.Tensor:
    edges = torch.zeros(1, frames, size, size, dtype=torch.bool)
    edges[..., 2:14, x] = True
    return edges


def test_edge_f1_identical_shifted_and_partial():
    ref = _vertical_line(5)
    assert metrics.edge_f1(ref, ref, tolerance=0).item() == 1.0
    # one pixel off: every edge has a partner within 1 px, none at 0 px
    assert metrics.edge_f1(_vertical_line(6), ref, tolerance=1).item() == 1.0
    assert metrics.edge_f1(_vertical_line(6), ref, tolerance=0).item() == 0.0
    assert metrics.edge_f1(_vertical_line(8), ref, tolerance=2).item() == 0.0
    # half the line: precision 1, recall 1/2 -> F1 = 2/3
    half = ref.clone()
    half[..., 8:, :] = False
    assert metrics.edge_f1(half, ref, tolerance=0).item() == pytest.approx(2 / 3)
    empty = torch.zeros_like(ref)
    assert metrics.edge_f1(empty, empty).item() == 1.0
    assert metrics.edge_f1(empty, ref).item() == 0.0
    assert metrics.edge_f1(ref, empty).item() == 0.0


def test_edges_from_control_reads_the_plus_one_pixels():
    control = -torch.ones(1, 3, 2, 4, 4)
    control[:, :, 1, 2, 3] = 1
    edges = metrics.edges_from_control(control)
    assert edges.shape == (1, 2, 4, 4) and edges.sum() == 1 and edges[0, 1, 2, 3]


def test_frechet_distance_closed_forms():
    d = 5
    mean1, mean2 = torch.zeros(d), torch.arange(d, dtype=torch.float64)
    var1, var2 = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    # diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = (mean1 - mean2).square().sum() + (var1.sqrt() - var2.sqrt()).square().sum()
    assert metrics.frechet_distance(mean1, torch.diag(var1), mean2, torch.diag(var2)) == pytest.approx(float(expected), rel=1e-9)
    # a full covariance against itself, and against a rotated-and-scaled copy: C vs 4C gives tr(C)
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T
    assert metrics.frechet_distance(mean1, cov, mean1, cov) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(mean1, cov, mean1, 4 * cov) == pytest.approx(float(torch.trace(cov)), rel=1e-8)
    # rank-deficient (fewer samples than dimensions): a rank-1 covariance against zero
    v = torch.randn(d, 1, dtype=torch.float64)
    assert metrics.frechet_distance(mean1, v @ v.T, mean1, torch.zeros(d, d, dtype=torch.float64)) == pytest.approx(float(v.square().sum()), rel=1e-8)


def test_frechet_distance_from_samples_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 4
    mu = torch.tensor([1.0, -1.0, 0.5, 0.0])
    x = torch.randn(n, d, generator=g)  # N(0, I)
    y = mu + 2 * torch.randn(n, d, generator=g)  # N(mu, 4 I)
    # |mu|^2 + tr(I + 4I - 2 * 2I) = |mu|^2 + d
    value = metrics.frechet_distance(*metrics.gaussian_statistics(x), *metrics.gaussian_statistics(y))
    assert value == pytest.approx(float(mu.square().sum()) + d, rel=0.02)


def test_frechet_distance_to_few_samples_equals_the_full_formula():
    """N <= D features take the N x N route of frechet_distance_to: the same value as the
    D x D eigendecompositions of frechet_distance, for a full-rank and a rank-deficient reference
    (to 1e-6 relative: the D x D route takes square roots of its rounding-level zero eigenvalues)."""
    g = torch.Generator().manual_seed(0)
    d = 64
    features = torch.randn(24, d, generator=g) * torch.linspace(0.1, 3.0, d) + 0.5
    for reference in (torch.randn(500, d, generator=g), 2 * torch.randn(10, d, generator=g) - 1):
        stats = metrics.gaussian_statistics(reference)
        full = metrics.frechet_distance(*metrics.gaussian_statistics(features), *stats)
        assert metrics.frechet_distance_to(features, stats) == pytest.approx(full, rel=1e-6)
        assert metrics.frechet_distance_to(features[:2], stats) == pytest.approx(
            metrics.frechet_distance(*metrics.gaussian_statistics(features[:2]), *stats), rel=1e-6)


def test_mean_pairwise_rms():
    samples = torch.stack([torch.full((3, 2, 4, 4), c) for c in (0.0, 1.0, 3.0)])
    assert metrics.mean_pairwise_rms(samples) == pytest.approx((1 + 3 + 2) / 3)
    assert metrics.mean_pairwise_rms(torch.zeros(4, 3, 2, 4, 4)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_pairwise_rms(torch.zeros(1, 3))


def test_bootstrap_spread_of_the_frechet_distance():
    g = torch.Generator().manual_seed(0)
    reference = metrics.gaussian_statistics(torch.randn(500, 3, generator=g))
    same = torch.randn(1, 4, 3, generator=g).expand(20, 4, 3)  # 20 identical videos of 4 frames
    assert metrics.bootstrap_frechet_std(same, reference) == 0.0
    # the spread shrinks like 1/sqrt(videos): 16x the videos, about 1/4 the spread
    few = metrics.bootstrap_frechet_std(torch.randn(25, 4, 3, generator=g) + 1, reference, resamples=200)
    many = metrics.bootstrap_frechet_std(torch.randn(400, 4, 3, generator=g) + 1, reference, resamples=200)
    assert few > 0 and 2.5 < few / many < 6.5


def test_distance_to_the_teachers_own_samples_is_zero_and_grows_with_a_shift():
    """The report's distance to the teacher is ``frechet_distance_to`` against a Gaussian fitted to
    the teacher's features: on the identical features it is 0 up to float rounding (the report
    writes exactly 0 for the reference row), a shifted copy lies |shift|^2 away, and its
    bootstrap spread is positive."""
    g = torch.Generator().manual_seed(0)
    for d in (64, 8):  # 48 frames: the N x N route (N <= D) and the D x D one
        teacher = torch.randn(12, 4, d, generator=g) * torch.linspace(0.2, 2.0, d)  # 12 videos x 4 frames
        stats = metrics.gaussian_statistics(teacher.flatten(0, 1))
        scale = float(torch.trace(stats[1]))
        assert metrics.frechet_distance_to(teacher.flatten(0, 1), stats) == pytest.approx(0.0, abs=1e-9 * scale)
        shifted = [metrics.frechet_distance_to((teacher + c).flatten(0, 1), stats) for c in (0.1, 0.3, 1.0)]
        assert shifted == pytest.approx([c * c * d for c in (0.1, 0.3, 1.0)], rel=1e-6)
        assert shifted[0] < shifted[1] < shifted[2]
        assert metrics.bootstrap_frechet_std(teacher + 0.3, stats, resamples=5) > 0
