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


def _noise_for(
    x: torch.Tensor, generator: Generators, noise_sampler: NoiseSampler | None, sigmas: torch.Tensor, stochastic: bool
) -> NoiseSampler:
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
    (c_skip x + c_out x0, see `lcm_boundary_condition`). Models are usually run without it, as ComfyUI does: at
    step 19, the lowest LCM step, c_skip < 7e-6 and 1 - c_out < 4e-6, and with 4 steps (lowest step 259) both
    are below 4e-8, so it moves x0 by about 1e-5 of its scale at most.
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
        t = (sigma.log()[:, None] - log_sigmas.to(sigma.device)[None, :]).abs().argmin(dim=1).to(x.dtype)
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


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: Lu et al. 2022b's multistep data-prediction solver with third-order differences on
    the SDE with noise share eta, as k-diffusion's `sample_dpmpp_3m_sde`. The last step returns the denoised x0.

    Default noise: one unit Gaussian per step from `generator` (k-diffusion uses a Brownian tree, which for
    these disjoint intervals has the same distribution).
    """
    noise = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = (-h_eta).expm1() / h_eta + 1
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + ((-h_eta).expm1() / h_eta + 1) * d
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# Adams-Bashforth weights for equally spaced steps, newest derivative first (Hairer et al., "Solving ODEs I",
# III.1, Table 1.1), as iPNDM uses them whatever the step sizes.
_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_ipndm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Improved pseudo numerical methods (iPNDM, Zhang & Chen 2023, "DEIS", Appendix): Euler steps in sigma on
    the Adams-Bashforth combination of up to `order` past derivatives (x - x0) / sigma, warming up with lower
    orders, as diffusers' IPNDMScheduler. The last step uses the combination too (ComfyUI's returns x0 there).
    Deterministic.
    """
    if not 1 <= order <= 4:
        raise ValueError(f"order must be 1 to 4, got {order}")
    s_in = x.new_ones([x.shape[0]])
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        ds = [_to_d(x, sigmas[i], denoised), *ds][:order]
        d = sum(weight * past for weight, past in zip(_ADAMS_BASHFORTH[len(ds) - 1], ds, strict=True))
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def _deis_coefficients(rho_t: float, rhos: list[float]) -> list[float]:
    """Integrals over [rhos[0], rho_t] of the Lagrange basis in log(rho) on the nodes `rhos` (newest first): the
    weights of the past noise predictions in DEIS's logrho step (diffusers' closed forms for orders 1 to 3).
    rho_t = 0 is the limit (every antiderivative vanishes there)."""

    def antiderivative(t: float, node: float, others: list[float]) -> float:
        if t == 0:
            return 0.0
        lt, lb = math.log(t), math.log(node)
        if not others:
            return t
        if len(others) == 1:
            lc = math.log(others[0])
            return t * (lt - lc - 1) / (lb - lc)
        lc, ld = math.log(others[0]), math.log(others[1])
        numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
        return numerator / ((lb - lc) * (lb - ld))

    coefficients = []
    for k, node in enumerate(rhos):
        others = rhos[:k] + rhos[k + 1 :]
        coefficients.append(antiderivative(rho_t, node, others) - antiderivative(rhos[0], node, others))
    return coefficients


@torch.no_grad()
def sample_deis(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 3,
) -> torch.Tensor:
    """Diffusion exponential integrator sampler (Zhang & Chen 2023, "DEIS", rho-AB with polynomial extrapolation
    in log(rho)), as diffusers' DEISMultistepScheduler (algorithm "deis", solver "logrho").

    The noise prediction (x - x0) / sigma is extrapolated through up to `order` past values; with fewer than 15
    steps the last step is first order and the one before at most second order, as diffusers'
    lower_order_final. Deterministic.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1 to 3, got {order}")
    steps = len(sigmas) - 1
    rho = [float(s) for s in sigmas.tolist()]
    s_in = x.new_ones([x.shape[0]])
    eps: list[torch.Tensor] = []
    for i in range(steps):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        eps = [_to_d(x, sigmas[i], denoised), *eps][:order]
        this_order = min(len(eps), order)
        if steps < 15:
            this_order = min(this_order, steps - i)
        coefficients = _deis_coefficients(rho[i + 1], [rho[i - k] for k in range(this_order)])
        x = x + sum(c * e for c, e in zip(coefficients, eps[:this_order], strict=True))
    return x


@torch.no_grad()
def sample_uni_pc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the order-2 unified predictor (UniP) with the corrector (UniC) applied to each
    step's result once the model has been evaluated there, data prediction, B(h) = e^h - 1 ("bh2"), as
    diffusers' UniPCMultistepScheduler with its defaults: order 1 on the first and last steps, the corrector at
    every model call but the first (the last step, to sigma 0, is not corrected). Deterministic.
    """
    lam = [math.inf if s == 0 else -math.log(s) for s in sigmas.tolist()]  # lambda = log(alpha / sigma_vp)
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    outputs: list[torch.Tensor] = []  # past x0 predictions, newest first
    last_x, last_order = x, 0
    for i in range(steps):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if i > 0:  # UniC: redo the last step with the new x0 as one more node
            x = _unipc_update(last_x, sigmas[i - 1], sigmas[i], lam, i - 1, outputs, last_order, denoised)
        outputs = [denoised, *outputs][:2]
        this_order = min(2, steps - i, len(outputs))
        last_x, last_order = x, this_order
        x = _unipc_update(x, sigmas[i], sigmas[i + 1], lam, i, outputs, this_order, None)
    return x


def _unipc_update(
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    lam: list[float],
    i: int,
    outputs: list[torch.Tensor],
    order: int,
    corrector_x0: torch.Tensor | None,
) -> torch.Tensor:
    """One UniP step (corrector_x0 None) or UniC step from sigmas[i] to sigmas[i + 1] with bh2 weights."""
    h = lam[i + 1] - lam[i]
    h_phi_1 = -1.0 if math.isinf(h) else math.expm1(-h)  # hh = -h in data prediction; B(h) = h_phi_1
    x0 = outputs[0]
    result = (sigma_next / sigma) * x - h_phi_1 * x0
    if order == 2:
        rk = (lam[i - 1] - lam[i]) / h
        d1 = (outputs[1] - x0) / rk
    if corrector_x0 is None:
        if order == 2:
            result = result - h_phi_1 * 0.5 * d1
        return result
    # b_k = h phi_{k+1}(h) k! / B(h) with phi from hh = -h; solve R rho = b for the corrector weights.
    hh = -h
    phi_k = h_phi_1 / hh - 1
    b1 = phi_k / h_phi_1
    if order == 1:
        return result - h_phi_1 * 0.5 * (corrector_x0 - x0)
    b2 = (phi_k / hh - 0.5) * 2 / h_phi_1
    rho_1 = (b1 - b2) / (1 - rk)
    rho_2 = b1 - rho_1
    return result - h_phi_1 * (rho_1 * d1 + rho_2 * (corrector_x0 - x0))
