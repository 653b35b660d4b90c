"""Noise schedules: the discrete DDPM schedule of Stable Diffusion and the sigma grids samplers walk.

Conventions follow k-diffusion (Karras et al. 2022): a noise level is a sigma with x = x0 + sigma * eps,
and a discrete model's sigma for training step t is sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).
Model sigmas are ascending in t; sampling grids are descending and end with an appended 0.
"""

from __future__ import annotations

import math

import torch

from sdcli.errors import UsageError

SCHEDULES = ("normal", "karras", "exponential", "leading", "leading_to_zero")
# Grids of training timesteps whose samplers (LDM's and diffusers' DDIM, DDPM) start from unit-variance noise.
TIMESTEP_SCHEDULES = ("leading", "leading_to_zero")


def alphas_cumprod_sd(
    num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Cumulative product of alphas for SD's "scaled linear" betas, as float32 of shape (num_train_steps,).

    Computed in float64 and rounded once at the end, as the original LDM code does
    (`make_beta_schedule` in float64, `np.cumprod`, then a float32 buffer). That is the schedule A1111
    and k-diffusion's `CompVisDenoiser` see. diffusers computes the same recipe in float32 throughout,
    which differs by up to ~1e-6 relative after the 1000-term product.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of each training step: sqrt((1 - a) / a), ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous training step for `sigma`, interpolating linearly in log-sigma between model sigmas.

    Same as k-diffusion's `DiscreteSchedule.sigma_to_t(quantize=False)`; the result has sigma's shape.
    """
    log_sigmas = sigmas.log()
    log_sigma = sigma.log().reshape(-1)
    dists = log_sigma - log_sigmas[:, None]  # (T, N)
    # Index of the last model sigma at or below sigma, kept one short of the end so high_idx is valid.
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.view(sigma.shape)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at a continuous training step `t`, interpolating linearly in log-sigma (k-diffusion's)."""
    log_sigmas = sigmas.log()
    t = t.float()
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
    return log_sigma.exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sigmas_normal(model_sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """`n` sigmas evenly spaced in training-step space from the last step to step 0, then 0.

    k-diffusion's `DiscreteSchedule.get_sigmas(n)`, A1111's "normal" (default) schedule.
    """
    t = torch.linspace(len(model_sigmas) - 1, 0, n, dtype=torch.float32, device=model_sigmas.device)
    return _append_zero(t_to_sigma(t, model_sigmas))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: `n` sigmas evenly spaced in sigma**(1/rho), then 0.

    `sigma_min` and `sigma_max` are Python floats, as in k-diffusion's `get_sigmas_karras`: the end
    points are computed in float64 and only the ramp is float32, which parity depends on.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_zero(sigmas)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """`n` sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0 (k-diffusion's)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float32).exp()
    return _append_zero(sigmas)


def make_sigmas(schedule: str, n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The descending grid of `n` sigmas plus a final one for `schedule`, float32 on model_sigmas' device.

    "normal", "karras", "exponential" end at 0; karras and exponential grids span the model's own smallest
    and largest sigma, as A1111 does. "leading" and "leading_to_zero" are the model's sigmas at the
    training steps `ddim_timesteps(n)`. "leading" (DDIM) then ends at step 0's sigma, the model's smallest:
    LDM's and diffusers' DDIM step last to alphas_cumprod[0] (set_alpha_to_one=False), so its result keeps
    that little noise. "leading_to_zero" (DDPM) ends at 0: diffusers' DDPMScheduler steps last to alpha 1.
    """
    if schedule == "normal":
        return sigmas_normal(model_sigmas, n)
    if schedule in TIMESTEP_SCHEDULES:
        last = model_sigmas[:1] if schedule == "leading" else model_sigmas.new_zeros([1])
        return torch.cat([model_sigmas[ddim_timesteps(n, len(model_sigmas)).to(model_sigmas.device)], last])
    # Python floats on purpose: k-diffusion and A1111 pass `.item()` values (see sigmas_karras).
    sigma_min, sigma_max = model_sigmas.min().item(), model_sigmas.max().item()
    if schedule == "karras":
        return sigmas_karras(n, sigma_min, sigma_max).to(model_sigmas.device)
    if schedule == "exponential":
        return sigmas_exponential(n, sigma_min, sigma_max).to(model_sigmas.device)
    raise UsageError(f"unknown schedule {schedule!r}; expected one of: {', '.join(SCHEDULES)}")


def ddim_timesteps(steps: int, num_train_steps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """Descending int64 training steps with "leading" spacing, as diffusers' DDIMScheduler.set_timesteps.

    With the SD defaults this is range(0, 1000, 1000 // steps) + 1, reversed: LDM's "uniform" DDIM
    discretisation (e.g. 20 steps: 951, 901, ..., 1).
    """
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be between 1 and {num_train_steps}, got {steps}")
    step_ratio = num_train_steps // steps
    return (torch.arange(steps, dtype=torch.int64) * step_ratio).flip(0) + steps_offset


def initial_noise_scale(schedule: str, sigma: torch.Tensor) -> torch.Tensor:
    """The std of the pure noise sampling starts from at noise level `sigma` (x = noise * scale).

    k-diffusion and A1111 start their grids at x = sigma * noise. LDM's and diffusers' DDIM and DDPM start
    from unit-variance x_T in the variance-preserving scaling x_T = sqrt(a) x0 + sqrt(1 - a) eps; in ours
    (x = x0 + sigma eps, sigma^2 = (1 - a) / a) that is x = x_T / sqrt(a) = x_T * sqrt(1 + sigma^2).
    """
    return (sigma**2 + 1) ** 0.5 if schedule in TIMESTEP_SCHEDULES else sigma
