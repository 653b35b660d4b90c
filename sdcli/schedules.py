"""Noise schedules: the discrete DDPM schedule of Stable Diffusion and the sigma grids samplers walk.

Conventions follow k-diffusion (Karras et al. 2022): a noise level is a sigma with x = x0 + sigma * eps,
and a discrete model's sigma for training step t is sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).
Model sigmas are ascending in t; sampling grids are descending and end with an appended 0.
"""

from __future__ import annotations

import math

import torch

from sdcli.errors import UsageError

# The grids --schedule accepts: k-diffusion/A1111 ones, ComfyUI ones, diffusers' spacings and LCM's steps.
SCHEDULES = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "trailing",
    "leading",
    "lcm",
)
# The grids of the timestep samplers (LDM's and diffusers' DDIM and DDPM), which start from unit-variance
# noise: both walk the "leading" training steps; DDIM ends at step 0's sigma, DDPM at 0.
TIMESTEP_SCHEDULES = ("ddim", "ddpm")


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

    Every grid of SCHEDULES ends at 0; karras and exponential grids span the model's own smallest and
    largest sigma, as A1111 does. The timestep samplers' grids "ddim" and "ddpm" are the model's sigmas at
    the training steps `ddim_timesteps(n)` ("leading" spacing). "ddim" then ends at step 0's sigma, the
    model's smallest: LDM's and diffusers' DDIM step last to alphas_cumprod[0] (set_alpha_to_one=False), so
    its result keeps that little noise. "ddpm" ends at 0: diffusers' DDPMScheduler steps last to alpha 1.
    """
    if schedule == "normal":
        return sigmas_normal(model_sigmas, n)
    if schedule in TIMESTEP_SCHEDULES:
        last = model_sigmas[:1] if schedule == "ddim" else model_sigmas.new_zeros([1])
        return torch.cat([model_sigmas[ddim_timesteps(n, len(model_sigmas)).to(model_sigmas.device)], last])
    # Python floats on purpose: k-diffusion and A1111 pass `.item()` values (see sigmas_karras).
    sigma_min, sigma_max = model_sigmas.min().item(), model_sigmas.max().item()
    if schedule == "karras":
        return sigmas_karras(n, sigma_min, sigma_max).to(model_sigmas.device)
    if schedule == "exponential":
        return sigmas_exponential(n, sigma_min, sigma_max).to(model_sigmas.device)
    if schedule in _GRIDS:
        return _GRIDS[schedule](n, model_sigmas)
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


# Grids chosen separately from the sampler (A1111's "Schedule type", ComfyUI's scheduler). Each takes
# (n, model_sigmas) and returns a descending float32 grid ending in 0 on model_sigmas' device; the grids made
# of training steps pick model_sigmas[t] exactly, as the discrete schedulers of diffusers do.


def _grid_at_steps(model_sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return _append_zero(model_sigmas[timesteps.to(model_sigmas.device)].to(torch.float32))


def _check_steps(n: int, most: int, schedule: str) -> None:
    if not 0 < n <= most:
        raise UsageError(f"the {schedule} schedule takes 1 to {most} steps, got {n}; choose a step count in that range")


def sigmas_sgm_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """`n + 1` points evenly spaced in training-step space from the last step to step 0, the last one dropped
    for the appended 0 (ComfyUI's "sgm_uniform": the uniform discretisation of SGM/SDXL's sampler configs)."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n + 1, dtype=torch.float32, device=model_sigmas.device)[:-1]
    return _append_zero(t_to_sigma(t, model_sigmas))


def sigmas_simple(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Every (T / n)-th model sigma from the top, truncated to an index (ComfyUI's "simple")."""
    stride = len(model_sigmas) / n
    steps = [len(model_sigmas) - 1 - int(k * stride) for k in range(n)]
    return _grid_at_steps(model_sigmas, torch.tensor(steps))


def sigmas_ddim_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Model sigmas at steps 1, 1 + T // n, 1 + 2 (T // n), ... below T, descending (ComfyUI's "ddim_uniform").

    When T is not a multiple of n this gives more than n sigmas (e.g. 8 for n = 7), as ComfyUI does. A model
    whose step-1 sigma is ~0 gets one stride fewer, and no 0 appended, since its grid already ends near 0.
    """
    count = len(model_sigmas)
    ends_at_zero = math.isclose(float(model_sigmas[1]), 0, abs_tol=1e-5)
    stride = max(count // (n + 1 if ends_at_zero else n), 1)
    steps = torch.arange(1, count, stride).flip(0)
    sigmas = model_sigmas[steps.to(model_sigmas.device)].to(torch.float32)
    return sigmas if ends_at_zero else _append_zero(sigmas)


def sigmas_beta(n: int, model_sigmas: torch.Tensor, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Training steps at the Beta(alpha, beta) quantiles 1, 1 - 1/n, ..., 1/n of the step range, rounded, repeats
    dropped (Lee et al. 2024, "Beta sampling is all you need", arXiv:2407.12173; ComfyUI's "beta")."""
    last = len(model_sigmas) - 1
    steps: list[int] = []
    for k in range(n):
        step = round(beta_ppf(1 - k * (1 / n), alpha, beta) * last)  # round half to even, as numpy.rint
        if not steps or step != steps[-1]:
            steps.append(step)
    return _grid_at_steps(model_sigmas, torch.tensor(steps))


def sigmas_trailing(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' "trailing" spacing: steps round(T - k T / n) - 1 for k < n, so the first is always T - 1."""
    count = len(model_sigmas)
    _check_steps(n, count, "trailing")
    steps = (count - torch.arange(n, dtype=torch.float64) * (count / n)).round().long() - 1
    return _grid_at_steps(model_sigmas, steps)


def sigmas_leading(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' "leading" spacing with SD's steps_offset 1 (the DDIM grid of `ddim_timesteps`)."""
    _check_steps(n, len(model_sigmas), "leading")
    return _grid_at_steps(model_sigmas, ddim_timesteps(n, len(model_sigmas)))


def lcm_timesteps(n: int, num_train_steps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """LCMScheduler's (and TCDScheduler's) inference steps: n of the `original_steps` distillation steps
    (k - 1, 2k - 1, ..., T - 1 with k = T // original_steps), taken from the top at indices floor(j original / n).
    For 4 steps: 999, 759, 499, 259."""
    _check_steps(n, original_steps, "lcm")
    stride = num_train_steps // original_steps
    distilled = (torch.arange(original_steps, 0, -1) * stride - 1).long()
    indices = (torch.arange(n, dtype=torch.float64) * (original_steps / n)).floor().long()
    return distilled[indices]


def sigmas_lcm(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The model sigmas of `lcm_timesteps`, then 0: the grid latent consistency models were distilled on."""
    return _grid_at_steps(model_sigmas, lcm_timesteps(n, len(model_sigmas)))


_GRIDS = {
    "sgm_uniform": sigmas_sgm_uniform,
    "simple": sigmas_simple,
    "ddim_uniform": sigmas_ddim_uniform,
    "beta": sigmas_beta,
    "trailing": sigmas_trailing,
    "leading": sigmas_leading,
    "lcm": sigmas_lcm,
}


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), in float64.

    Continued fraction for I_x (Abramowitz & Stegun 26.5.8) evaluated by the modified Lentz method, on the
    side of the mean where it converges fast (I_x(a, b) = 1 - I_{1-x}(b, a)).
    """
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile: the x in [0, 1] with I_x(a, b) = q, by bisection to float64 resolution."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if betainc(a, b, mid) < q:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)
