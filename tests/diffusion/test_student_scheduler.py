"""few_step_euler_scheduler: set_timesteps(K) alone gives the student's levels and sampler."""

import pytest
import torch

from distill_pl.diffusion.flow import shift_sigma
from distill_pl.diffusion.sampling import few_step_sample
from distill_pl.diffusion.student_scheduler import few_step_euler_scheduler
from tests.diffusion.test_sampling import exact

LADDERS = {
    "one step": [1.0],
    "two steps": [1.0, 0.3],
    "evenly spaced": [1.0, 0.75, 0.5, 0.25],
    "shift 5": [float(shift_sigma(s, 5.0)) for s in (1.0, 0.75, 0.5, 0.25)],
    "shift 0.5": [float(shift_sigma(s, 0.5)) for s in (1.0, 0.8, 0.6, 0.4, 0.2)],
}


@pytest.mark.parametrize("levels", LADDERS.values(), ids=LADDERS.keys())
def test_stepping_the_scheduler_is_the_few_step_sampler(levels):
    """As a pipeline uses it (set_timesteps(K), then K steps with one generator), the scheduler
    samples at the levels and equals few_step_sample with the same generator."""
    scheduler = few_step_euler_scheduler(levels)
    scheduler.set_timesteps(len(levels))
    assert [float(s) for s in scheduler.sigmas] == pytest.approx(levels + [0.0], abs=1e-6)
    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(4)
    x = eps
    for t, s in zip(scheduler.timesteps, scheduler.sigmas):
        x = scheduler.step(exact(x, torch.full((3,), float(s))), t, x, generator=g, return_dict=False)[0]
    expected = few_step_sample(exact, eps, levels, torch.Generator().manual_seed(4))
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    if len(levels) > 1:  # and the re-noise draws matter
        assert (x - few_step_sample(exact, eps, levels, torch.Generator().manual_seed(5))).abs().max() > 1e-2


def test_ladders_no_scheduler_gives_are_refused():
    with pytest.raises(ValueError, match=r"noise levels \[1.0, 0.9, 0.5, 0.1\] from set_timesteps\(4\)"):
        few_step_euler_scheduler([1.0, 0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="must start at 1.0"):
        few_step_euler_scheduler([0.9, 0.5])
