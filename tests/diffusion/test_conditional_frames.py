"""Conditional latent frames: the sampler's path velocity, the draws, the masked mean, and how
training gives a clip's first frames (closed forms on small tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.diffusion.conditional_frames import (
    draw_num_conditional_frames,
    frames_of_pixels,
    keep_conditional_frames,
    masked_mean,
)
from distill_pl.methods.dmd2 import DMD2Objective
from distill_pl.methods.kd import kd_loss
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.training.batch import conditional_frame_probabilities, give_first_frames


def test_keep_conditional_frames_puts_the_path_velocity_on_given_frames():
    g = torch.Generator().manual_seed(0)
    noise, clean, x = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 4, 1, 1)
    mask[1, :, :2] = 1
    fn = keep_conditional_frames(lambda x_t, sigma: 2 * x_t, noise, clean, mask)
    v = fn(x, torch.ones(2))
    torch.testing.assert_close(v[0], 2 * x[0], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, 2:], 2 * x[1, :, 2:], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, :2], noise[1, :, :2] - clean[1, :, :2], rtol=0, atol=0)
    plain = lambda x_t, sigma: x_t  # noqa: E731
    assert keep_conditional_frames(plain, noise, None, None) is plain


def test_frames_of_pixels_and_draws():
    assert [frames_of_pixels(n, 4) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    counts = draw_num_conditional_frames(20000, (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
    assert counts.dtype == torch.long and set(counts.tolist()) == {0, 1, 2}
    shares = torch.bincount(counts).float() / counts.numel()
    torch.testing.assert_close(shares, torch.tensor([0.6, 0.2, 0.2]), rtol=0, atol=0.02)
    with pytest.raises(ValueError, match=r"conditional_frame_probabilities \[0.5, 0.2\]: .* summing to 1"):
        draw_num_conditional_frames(1, (0.5, 0.2))


def test_masked_mean_and_kd_loss_leave_given_frames_out():
    error = torch.arange(2 * 1 * 3, dtype=torch.float32).view(2, 1, 3, 1, 1)
    keep = torch.tensor([[1.0, 1, 1], [0, 1, 1]]).view(2, 1, 3, 1, 1)
    assert masked_mean(error, keep).item() == pytest.approx(((0 + 1 + 2) / 3 + (4 + 5) / 2) / 2)
    assert masked_mean(error, None).item() == error.mean().item()
    text = torch.zeros(2, 1, 1)
    x_g, target = torch.zeros(2, 1, 3, 1, 1), error.sqrt()
    cond = Conditioning(text, None, None, torch.zeros_like(x_g), torch.tensor([0, 1]))
    assert kd_loss(x_g, target, cond).item() == pytest.approx((3 / 3 + 9 / 2) / 2)
    assert kd_loss(x_g, target).item() == pytest.approx(15 / 6)


class Takes(Denoiser):
    takes_conditional_frames = True


class TakesNone(Denoiser):
    pass


def test_run_settings_and_first_frames():
    assert conditional_frame_probabilities(Takes(), None) == (0.6, 0.2, 0.2)
    assert conditional_frame_probabilities(TakesNone(), None) == ()
    assert conditional_frame_probabilities(Takes(), [1.0]) == ()
    assert conditional_frame_probabilities(TakesNone(), [1.0]) == ()
    assert conditional_frame_probabilities(Takes(), [0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="TakesNone takes no conditional frames"):
        conditional_frame_probabilities(TakesNone(), [0.5, 0.5])

    clean = torch.randn(3, 2, 3, 1, 1)
    cond = give_first_frames(Conditioning(torch.zeros(3, 1, 1)), clean, torch.tensor([0, 2, 5]))
    assert cond.num_cond_frames.tolist() == [0, 2, 2]  # capped at T' - 1: one frame is generated
    assert cond.cond_latents is clean
    assert cond.generated_frames(3)[:, 0, :, 0, 0].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    # the negative prompt's branch keeps the frames; select and cat carry them
    assert cond.with_text(torch.ones(3, 1, 1), None).num_cond_frames is cond.num_cond_frames
    both = Conditioning.cat([cond, cond.select(slice(0, 1))])
    assert both.num_cond_frames.tolist() == [0, 2, 2, 0] and both.cond_latents.shape[0] == 4


def test_dmd2_draws_the_frames_last_so_the_other_draws_stay_the_same():
    networks = (nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity())
    plain = DMD2Objective(*networks, feature_block=0)
    drawing = DMD2Objective(*networks, feature_block=0, conditional_frame_probabilities=(0.6, 0.2, 0.2))
    like = torch.zeros(1)
    shape = (4, 2, 3, 2, 2)
    a = plain.draw_batch([torch.Generator().manual_seed(j) for j in range(4)], shape, like)
    b = drawing.draw_batch([torch.Generator().manual_seed(j) for j in range(4)], shape, like)
    assert a.num_cond_frames is None and b.num_cond_frames.shape == (4,)
    for name in ("eps", "sigma", "noise", "noise_real", "step", "renoise"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert b.rows(slice(1, 3)).num_cond_frames.tolist() == b.num_cond_frames[1:3].tolist()
