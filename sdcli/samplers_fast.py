"""Few-step and higher-order samplers, in the contract of `sdcli.samplers`.

`sample_x(denoiser, x, sigmas, *, generator=None, callback=None, noise_sampler=None) -> x` with
`denoiser(x, sigma) -> x0`, sigma of shape (B,), x at noise level sigmas[0] in k-diffusion's scale
(x = x0 + sigma * eps) and sigmas descending to 0. Stochastic samplers draw one unit noise of x's shape per
noise call from `generator` (one per batch item allowed), after the initial noise, or take them from
`noise_sampler(sigma, sigma_next)`.

diffusers' schedulers run in the variance-preserving scale x_vp = x / sqrt(1 + sigma^2), with
log(alpha / sigma_vp) = -log(sigma). Their data- and noise-prediction solvers are invariant under that change of
scale, so the steps below are theirs rewritten in sigma alone; the tests check parity step for step.
"""

from __future__ import annotations

import math

import torch

from sdcli.samplers import Callback, Denoiser, Generators, NoiseSampler, _noise_sampler, _report, _to_d
from sdcli.schedules import alphas_cumprod_sd, sigmas_from_alphas_cumprod


def _noise_for(x: torch.Tensor, generator: Generators, noise_sampler: NoiseSampler | None, sigmas, stochastic: bool):
    # A grid whose only step goes to 0 draws nothing, so it needs no generator (e.g. a 1-step LCM image).
    needed = stochastic and bool((sigmas[1:] > 0).any())
    return _noise_sampler(x, generator, noise_sampler, 1.0 if needed else 0.0)


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Latent consistency multistep sampling (Luo et al. 2023, Algorithm 1): jump to the model's x0, then noise
    it afresh to the next sigma. The last step returns x0.

    Equals diffusers' LCMScheduler when the denoiser includes LCM's boundary condition
    (c_skip x + c_out x0, see `lcm_boundary_condition`); models are usually run without it, as ComfyUI does,
    since for every LCM timestep above 0 it changes x0 by under 1e-5 relative.
    """
    noise = _noise_for(x, generator, noise_sampler, sigmas, True)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


def lcm_boundary_condition(
    denoiser: Denoiser, model_sigmas: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> Denoiser:
    """Wrap a denoiser with the consistency models' boundary condition as diffusers' LCMScheduler applies it:
    x0' = c_skip(t) x_vp + c_out(t) x0 with t the nearest training step of sigma, scaled by timestep_scaling.

    In the sigma scale x_vp = x / sqrt(1 + sigma^2). At t = 0 this is the identity skip (x0' = x_vp).
    """
    log_sigmas = model_sigmas.log()

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = denoiser(x, sigma)
        t = (sigma.log()[:, None] - log_sigmas[None, :]).abs().argmin(dim=1).to(x.dtype)
        scaled = t * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_vp = x / (1 + sigma**2).sqrt().view(shape)
        return c_out.view(shape) * x0 + c_skip.view(shape) * x_vp

    return wrapped


def _nearest_step(sigma: torch.Tensor, model_sigmas: torch.Tensor) -> int:
    # The training step whose sigma is nearest in log (ComfyUI's ModelSamplingDiscrete.timestep).
    return int((model_sigmas.log() - sigma.log()).abs().argmin())


@torch.no_grad()
def sample_tcd(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    gamma: float = 0.3,
    model_sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, eq. 13; Hyper-SD
    and TCD models), as diffusers' TCDScheduler with eta = gamma.

    Each step goes deterministically (DDIM) to the intermediate step s = floor((1 - gamma) t_next) on the
    model's discrete schedule, then forward-diffuses with fresh noise to sigma_next. gamma = 0 is DDIM between
    grid points; gamma = 1 jumps to (nearly) x0 and renoises, as `sample_lcm`. As in diffusers, the last step
    stops at the sigma of step 0 and returns that sample in the variance-preserving scale x / sqrt(1 + sigma^2),
    the latent diffusers decodes. `model_sigmas` (ascending, one per training step) defaults to SD's schedule.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if model_sigmas is None:
        model_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_sd())
    model_sigmas = model_sigmas.to(sigmas.device)
    noise = _noise_for(x, generator, noise_sampler, sigmas, gamma > 0)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        sigma_next = sigmas[i + 1]
        t_next = _nearest_step(sigma_next, model_sigmas) if sigma_next > 0 else 0
        sigma_s = model_sigmas[math.floor((1 - gamma) * t_next)].to(x.dtype)
        x = denoised + sigma_s * _to_d(x, sigmas[i], denoised)
        if sigma_next == 0:
            x = x / (1 + sigma_s**2).sqrt()
        elif gamma > 0:
            x = x + (sigma_next**2 - sigma_s**2).clamp(min=0).sqrt() * noise(sigmas[i], sigma_next)
    return x
