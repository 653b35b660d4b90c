"""The schedules chosen apart from the sampler equal their references: diffusers' timestep spacings (trailing,
leading, LCM/TCD steps) through its own schedulers' sigmas, and ComfyUI's published definitions (sgm_uniform,
simple, ddim_uniform, beta) written out here as the one-line formulas ComfyUI publishes, on k-diffusion's model
schedule. scipy is the reference for the Beta quantile."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from kdiffusion_ref import load

from sdcli.errors import UsageError
from sdcli.schedules import (
    SCHEDULES,
    alphas_cumprod_sd,
    beta_ppf,
    betainc,
    lcm_timesteps,
    make_sigmas,
    sigmas_from_alphas_cumprod,
)

SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEP_COUNTS = [1, 2, 3, 4, 7, 8, 10, 16, 20, 25, 30, 50]


@pytest.fixture(scope="module")
def model_sigmas() -> torch.Tensor:
    return sigmas_from_alphas_cumprod(alphas_cumprod_sd())


def _diffusers_model_sigmas(scheduler) -> torch.Tensor:
    return sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("n", STEP_COUNTS + [333])
def test_timestep_spacings_equal_diffusers_euler_scheduler_sigmas(spacing, n):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(n)
    ours = make_sigmas(spacing, n, _diffusers_model_sigmas(scheduler))
    assert ours.dtype == torch.float32 and ours[-1] == 0 and len(ours) == n + 1
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=1e-6, atol=0)


def test_trailing_spacing_formula():
    # The statement of it: t = round(arange(1000, 0, -1000 / n)) - 1.
    for n in (3, 6, 7, 16, 40):
        expected = np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1
        scheduler = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
        scheduler.set_timesteps(n)
        assert scheduler.timesteps.round().long().tolist() == expected.tolist()


@pytest.mark.parametrize("scheduler_class", [LCMScheduler, TCDScheduler])
def test_lcm_timesteps_equal_diffusers(scheduler_class):
    scheduler = scheduler_class(**SD_CONFIG)
    for n in range(1, 51):
        scheduler.set_timesteps(n)
        assert lcm_timesteps(n).tolist() == scheduler.timesteps.tolist(), n
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]


def test_lcm_grid_is_model_sigmas_at_lcm_timesteps(model_sigmas):
    grid = make_sigmas("lcm", 4, model_sigmas)
    assert torch.equal(grid, torch.cat([model_sigmas[[999, 759, 499, 259]], torch.zeros(1)]))
    with pytest.raises(UsageError, match="1 to 50 steps"):
        make_sigmas("lcm", 51, model_sigmas)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_sgm_uniform_is_normal_on_n_plus_one_points(model_sigmas, n):
    # ComfyUI: sigma(t) at linspace(timestep(sigma_max), timestep(sigma_min), n + 1)[:-1], then 0.
    _, external = load()
    schedule = external.DiscreteEpsDDPMDenoiser(None, alphas_cumprod_sd(), quantize=False)
    t = torch.linspace(999, 0, n + 1)[:-1]
    expected = torch.cat([schedule.t_to_sigma(t), torch.zeros(1)])
    assert torch.equal(make_sigmas("sgm_uniform", n, model_sigmas), expected)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_simple_equals_comfyui_definition(model_sigmas, n):
    # ComfyUI: sigmas[-(1 + int(x * len(sigmas) / n))] for x < n, then 0.
    stride = len(model_sigmas) / n
    expected = [float(model_sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0]
    assert torch.equal(make_sigmas("simple", n, model_sigmas), torch.tensor(expected))


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_uniform_equals_comfyui_definition(model_sigmas, n):
    # ComfyUI: [0] + sigmas[1], sigmas[1 + s], ... (s = len // n, below len), reversed.
    stride = max(len(model_sigmas) // n, 1)
    expected = [0.0] + [float(model_sigmas[x]) for x in range(1, len(model_sigmas), stride)]
    ours = make_sigmas("ddim_uniform", n, model_sigmas)
    assert torch.equal(ours, torch.tensor(expected[::-1]))
    assert len(ours) - 1 >= n  # more than n when 1000 is not a multiple of n (e.g. 7 -> 8), as in ComfyUI


def test_ddim_uniform_for_a_grid_already_ending_near_zero():
    model_sigmas = torch.cat([torch.zeros(1), torch.linspace(1e-6, 10, 99)])
    ours = make_sigmas("ddim_uniform", 4, model_sigmas)
    stride = len(model_sigmas) // 5
    assert torch.equal(ours, model_sigmas[list(range(1, 100, stride))].flip(0))


@pytest.mark.parametrize("n", STEP_COUNTS + [100, 200])
def test_beta_equals_comfyui_definition_with_scipy(model_sigmas, n):
    # ComfyUI: rint(scipy.stats.beta.ppf(1 - linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999), repeats
    # dropped, sigmas at those steps, then 0.
    steps = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
    expected, last = [], -1
    for t in steps:
        if t != last:
            expected.append(float(model_sigmas[int(t)]))
        last = t
    ours = make_sigmas("beta", n, model_sigmas)
    assert torch.equal(ours, torch.tensor(expected + [0.0]))
    if n == 200:
        assert len(ours) - 1 < n  # repeats were dropped


def test_betainc_and_beta_ppf_equal_scipy():
    for a, b in ((0.6, 0.6), (0.5, 2.0), (2.0, 5.0), (7.0, 1.5)):
        for x in np.linspace(0, 1, 57):
            assert betainc(a, b, float(x)) == pytest.approx(scipy.special.betainc(a, b, x), abs=1e-13)
            assert beta_ppf(float(x), a, b) == pytest.approx(scipy.stats.beta.ppf(x, a, b), abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_descends_to_zero(model_sigmas, schedule):
    for n in (1, 4, 9):
        grid = make_sigmas(schedule, n, model_sigmas)
        assert grid.dtype == torch.float32 and grid[-1] == 0 and grid[-2] > 0
        assert torch.all(grid[:-1] > grid[1:]), (schedule, n, grid)
        assert float(model_sigmas[0]) <= grid[-2] <= grid[0] <= float(model_sigmas[-1]) * (1 + 1e-6)


def test_unknown_schedule_lists_all():
    with pytest.raises(UsageError, match="sgm_uniform, simple, ddim_uniform, beta, trailing, leading, lcm"):
        make_sigmas("linear", 10, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
