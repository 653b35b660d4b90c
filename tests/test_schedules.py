"""Schedules equal the references: LDM's alphas_cumprod recipe, k-diffusion's DiscreteSchedule and sigma
grids, diffusers' DDIM/DDPM timesteps."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from kdiffusion_ref import load

from sdcli.errors import UsageError
from sdcli.schedules import (
    alphas_cumprod_sd,
    ddim_timesteps,
    initial_noise_scale,
    make_sigmas,
    sigma_to_t,
    sigmas_exponential,
    sigmas_from_alphas_cumprod,
    sigmas_karras,
    sigmas_normal,
    t_to_sigma,
)

SD_SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
)


@pytest.fixture(scope="module")
def kd_schedule():
    """k-diffusion's DiscreteSchedule as CompVisDenoiser builds it from a model's alphas_cumprod."""
    _, external = load()
    return external.DiscreteEpsDDPMDenoiser(None, alphas_cumprod_sd(), quantize=False)


def test_alphas_cumprod_equals_ldm_float64_recipe():
    # ldm.modules.diffusionmodules.util.make_beta_schedule("linear") and DDPM.register_schedule:
    # betas in float64, np.cumprod in float64, then stored as a float32 buffer.
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    expected = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    ours = alphas_cumprod_sd()
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, expected)


def test_alphas_cumprod_close_to_diffusers_float32_recipe():
    # diffusers runs the same recipe in float32; the 1000-term product drifts by about 1e-6 relative.
    reference = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    torch.testing.assert_close(alphas_cumprod_sd(), reference, rtol=2e-6, atol=0)


def test_model_sigmas_equal_kdiffusion_discrete_eps_denoiser(kd_schedule):
    assert torch.equal(sigmas_from_alphas_cumprod(alphas_cumprod_sd()), kd_schedule.sigmas)


def test_sigma_to_t_equals_kdiffusion(kd_schedule):
    model_sigmas = kd_schedule.sigmas
    generator = torch.Generator().manual_seed(0)
    # Inside the range, at the model's own sigmas (integer t) and beyond both ends (clamped).
    inside = torch.exp(torch.empty(64).uniform_(-3.6, 2.7, generator=generator))
    sigma = torch.cat([inside, model_sigmas[::97], torch.tensor([0.01, 20.0])])
    assert torch.equal(sigma_to_t(sigma, model_sigmas), kd_schedule.sigma_to_t(sigma))
    scalar = torch.tensor(3.3)
    assert torch.equal(sigma_to_t(scalar, model_sigmas), kd_schedule.sigma_to_t(scalar))


def test_t_to_sigma_equals_kdiffusion(kd_schedule):
    t = torch.cat([torch.linspace(0, 999, 77), torch.tensor([0.0, 500.0, 999.0, 12.25])])
    assert torch.equal(t_to_sigma(t, kd_schedule.sigmas), kd_schedule.t_to_sigma(t))


@pytest.mark.parametrize("n", [1, 10, 15, 30])
def test_normal_sigmas_equal_kdiffusion_get_sigmas(kd_schedule, n):
    ours = sigmas_normal(kd_schedule.sigmas, n)
    assert torch.equal(ours, kd_schedule.get_sigmas(n))
    assert torch.equal(make_sigmas("normal", n, kd_schedule.sigmas), ours)


@pytest.mark.parametrize("n", [10, 15, 30])
def test_karras_and_exponential_sigmas_equal_kdiffusion(kd_schedule, n):
    sampling, _ = load()
    # A1111 passes the model's extreme sigmas as Python floats.
    sigma_min, sigma_max = kd_schedule.sigmas[0].item(), kd_schedule.sigmas[-1].item()
    karras = sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    exponential = sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    assert torch.equal(sigmas_karras(n, sigma_min, sigma_max), karras)
    assert torch.equal(make_sigmas("karras", n, kd_schedule.sigmas), karras)
    assert torch.equal(sigmas_exponential(n, sigma_min, sigma_max), exponential)
    assert torch.equal(make_sigmas("exponential", n, kd_schedule.sigmas), exponential)
    assert torch.equal(
        sigmas_karras(n, sigma_min, sigma_max, rho=3.0), sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho=3.0)
    )


def test_make_sigmas_unknown_schedule_is_usage_error():
    with pytest.raises(UsageError, match="normal, karras, exponential"):
        make_sigmas("linear", 10, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333])
def test_ddim_timesteps_equal_diffusers_leading_spacing(steps):
    for scheduler in (DDIMScheduler(**SD_SCHEDULER_CONFIG), DDPMScheduler(**SD_SCHEDULER_CONFIG)):
        scheduler.set_timesteps(steps)
        ours = ddim_timesteps(steps)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, scheduler.timesteps)


def test_ddim_timesteps_rejects_bad_step_counts():
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    with pytest.raises(ValueError):
        ddim_timesteps(1001)


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_leading_grids_are_the_sigmas_of_diffusers_timesteps(steps):
    alphas_cumprod = alphas_cumprod_sd()
    model_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    for schedule, scheduler, last in (
        ("ddim", DDIMScheduler(**SD_SCHEDULER_CONFIG, set_alpha_to_one=False), model_sigmas[0]),  # to step 0
        ("ddpm", DDPMScheduler(**SD_SCHEDULER_CONFIG), 0.0),  # to alpha = 1
    ):
        scheduler.set_timesteps(steps)
        a = alphas_cumprod[scheduler.timesteps]
        grid = make_sigmas(schedule, steps, model_sigmas)
        assert torch.equal(grid[:-1], ((1 - a) / a) ** 0.5) and grid[-1].item() == pytest.approx(float(last))


def test_initial_noise_is_unit_variance_in_vp_scaling_only_on_timestep_grids():
    sigma = torch.tensor(14.6)
    assert initial_noise_scale("ddim", sigma).item() == pytest.approx((14.6**2 + 1) ** 0.5)
    assert initial_noise_scale("ddpm", sigma).item() == pytest.approx((14.6**2 + 1) ** 0.5)
    assert initial_noise_scale("karras", sigma) is sigma
