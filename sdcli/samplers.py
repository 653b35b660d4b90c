"""Samplers as pure functions, in k-diffusion's contract.

Every sampler: `sample_x(denoiser, x, sigmas, *, generator=None, callback=None) -> x`, where
`denoiser(x, sigma) -> x0` takes sigma of shape (B,), `x` starts at noise level sigmas[0] and `sigmas`
descends to 0, or for DDIM to the model's smallest sigma (see sdcli.schedules). DDIM and DDPM walk the
sigmas of their training timesteps, so eps- and v-prediction are handled once, in the denoiser.

Every sampler takes the same keywords: `generator`, `callback`, `noise_sampler` (deterministic ones ignore
the first and last). Randomness comes only from `generator` -- one torch.Generator, or a list with one per
batch item as in diffusers -- or from an explicit `noise_sampler(sigma, sigma_next) -> unit noise`, never
from torch's global RNG, so an image is reproducible from its own seed. Noise is drawn on the generator's
device and moved to x's, as diffusers' `randn_tensor` does. `callback` gets {"i", "x", "sigma", "denoised"}.
The step formulas mirror k-diffusion 0.1.1 and diffusers' schedulers term by term; the tests check parity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    # One generator per batch item, each drawing its own item's noise (diffusers' randn_tensor does the same).
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    shape = (1, *x.shape[1:])
    draws = [torch.randn(shape, generator=g, dtype=x.dtype, device=g.device).to(x.device) for g in generator]
    return torch.cat(draws)


class IncrementNoise:
    """A noise sampler from a source of unit Gaussians, consistent with one Brownian path.

    `draw()` returns the next unit Gaussian of x's shape (one call of an image's noise stream). k-diffusion's
    SDE samplers use torchsde's Brownian tree, noise(s0, s1) = (W(s1) - W(s0)) / sqrt|s1 - s0| in sigma-time.
    Calls over disjoint intervals are independent draws. DPM++ SDE asks for (sigma, mid) and then (sigma,
    sigma_next) within one step; a Brownian path makes these correlated, so the second call extends the first
    increment by an independent piece. That is exactly the tree's distribution for these calls, without
    depending on torchsde; the numbers differ from a tree's (A1111 images won't match).
    """

    def __init__(self, draw: Callable[[], torch.Tensor]) -> None:
        self.draw = draw
        self.last: tuple[float, float, torch.Tensor] | None = None

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        s0, s1 = float(sigma), float(sigma_next)
        noise = self.draw()
        if self.last is not None:
            last_s0, last_s1, last_noise = self.last
            a, b = abs(last_s1 - s0), abs(s1 - last_s1)
            if last_s0 == s0 and (s1 - s0) * (last_s1 - s0) > 0 and abs(s1 - s0) > a:
                noise = (last_noise * a**0.5 + noise * b**0.5) / (a + b) ** 0.5
        self.last = (s0, s1, noise)
        return noise


def _noise_sampler(
    x: torch.Tensor, generator: Generators, noise_sampler: NoiseSampler | None, eta: float
) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    if generator is None and not eta:  # eta = 0 is deterministic: any noise is scaled by 0
        return lambda sigma, sigma_next: torch.zeros_like(x)
    if generator is None:
        raise ValueError("a stochastic sampler needs a torch.Generator (or a noise_sampler)")
    return IncrementNoise(lambda: _randn(x, generator))


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    # Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma.
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float):
    """Split a step to sigma_to into a deterministic step to sigma_down plus fresh noise of std sigma_up."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _report(callback: Callback | None, i: int, x: torch.Tensor, key: str, level, denoised: torch.Tensor):
    if callback is not None:
        callback({"i": i, "x": x, key: level, "denoised": denoised})


def _t(sigma: torch.Tensor) -> torch.Tensor:
    # DPM-Solver's time variable: t = -log(sigma) (= half log-SNR for sigma_data = 1).
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE: Karras et al. 2022, Algorithm 2 with S_churn = 0.

    Deterministic; `generator` and `noise_sampler` are accepted (and unused) so that every sampler has the
    same signature.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = _to_d(x, sigmas[i], denoised)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler ("Euler a"): an Euler step to sigma_down, then fresh noise up to the next sigma.

    The DDPM ancestral step (Ho et al. 2020) in Karras et al. 2022's ODE form, as in k-diffusion.
    """
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        d = _to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Heun's second-order method: Karras et al. 2022, Algorithm 2 with S_churn = 0 (deterministic).

    The last step, to sigma = 0, is an Euler step, as in the paper. `generator`/`noise_sampler` are unused.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = _to_d(x, sigmas[i], denoised)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, midpoint in log-sigma) in Karras et al. 2022's Algorithm 2 frame.

    k-diffusion's `sample_dpm_2`: derivative at the geometric midpoint of sigma and sigma_next; Euler to 0.
    Deterministic (`generator`/`noise_sampler` unused).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = _to_d(x, sigmas[i], denoised)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver-2 ("DPM2 a"): a DPM-2 step to sigma_down, then fresh noise (k-diffusion's)."""
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def lms_coefficient(order: int, t: Sequence[float], i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial on nodes t[i], ..., t[i-order+1]
    that is 1 at t[i-j] and 0 at the other nodes.

    Exact, without scipy: the polynomial is expanded in u = tau - t[i] (shifting to the interval's start
    keeps the powers small and avoids cancellation) and integrated term by term in float64.
    k-diffusion gets the same number from `scipy.integrate.quad`, which is exact for a cubic up to
    rounding (with numpy 2 its integrand is evaluated in float32, so the two differ by ~1e-7 relative).
    """
    coeffs = [1.0]  # ascending powers of u
    denominator = 1.0
    for k in range(order):
        if k == j:
            continue
        root = t[i - k] - t[i]
        product = [0.0] * (len(coeffs) + 1)
        for p, c in enumerate(coeffs):  # multiply by (u - root)
            product[p + 1] += c
            product[p] -= c * root
        coeffs = product
        denominator *= t[i - j] - t[i - k]
    h = t[i + 1] - t[i]
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(coeffs)) / denominator


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep: the classical Adams-Bashforth method (Hairer et al., "Solving ODEs I", III.1) on
    the nonuniform sigma grid, over up to `order` past derivatives of Karras et al. 2022's ODE, as in
    k-diffusion's `sample_lms`. Coefficients come from `lms_coefficient`. Deterministic (`generator` and
    `noise_sampler` unused).
    """
    t = [float(s) for s in sigmas.tolist()]
    s_in = x.new_ones([x.shape[0]])
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        ds.append(_to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, t, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=True))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S) ("DPM++ 2S a"): Lu et al. 2022b, Alg. 1 (single-step, r = 1/2),
    stepping to sigma_down and then adding fresh noise, as k-diffusion does."""
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = denoiser(x_2, _sigma(s) * s_in)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): Lu et al. 2022b, "DPM-Solver++", Algorithm 2 (multistep, data prediction).

    First and last steps are first order (DDIM-like), as in k-diffusion. Deterministic (`generator` and
    `noise_sampler` unused).
    """
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant: Lu et al. 2022b, SDE-DPM-Solver++(2M) (Appendix), as in
    k-diffusion's `sample_dpmpp_2m_sde(solver_type="midpoint")`. The last step returns the denoised x0.

    Default noise: unit Gaussians from `generator`, one per step (see `IncrementNoise`); k-diffusion
    uses a torchsde Brownian tree, which for these disjoint intervals has the same distribution.
    """
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, "DPM++ SDE"): Lu et al. 2022b's second-order single-step solver with an
    ancestral noise split at the intermediate point s = t + r h, as in k-diffusion's `sample_dpmpp_sde`.

    Default noise: unit Gaussians from `generator`, the two draws of a step correlated as a Brownian path
    would make them (see `IncrementNoise`); k-diffusion uses a torchsde Brownian tree instead.
    """
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, i, x, "sigma", sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Step 1: to the intermediate point s, with its share of the noise.
        sd, su = _ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma(t), _sigma(s)) * su
        denoised_2 = denoiser(x_2, _sigma(s) * s_in)
        # Step 2: the full step with the second-order combination of both x0 estimates.
        sd, su = _ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma(t), _sigma(t_next)) * su
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma_t(eta) of eq. 16.

    Written in our scaling, derived from the paper's variance-preserving one. With a = alphas_cumprod[t]
    and sigma^2 = (1 - a) / a, the paper's x_t = sqrt(a) x0 + sqrt(1 - a) eps is x_t = sqrt(a) x, where
    x = x0 + sigma eps (so x = x_t * sqrt(1 + sigma^2)). Eq. 12 from level a to a' (sigma to sigma'):
        x_t' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z,  std^2 = eta^2 (1 - a')/(1 - a) (1 - a/a'),
    divided by sqrt(a'):  x' = x0 + sigma_down eps + sigma_up z, with (r = sigma'^2 / sigma^2)
        sigma_up^2 = std^2 / a' = eta^2 sigma'^2 (1 - r),  sigma_down^2 = (1 - a' - std^2) / a' = sigma'^2 - sigma_up^2,
    where x0 = D(x, sigma) and eps = (x - x0) / sigma. With eta = 0 this is an Euler step; with eta = 1
    it is DDPM's posterior (see sample_ddpm).

    On the "ddim" grid (schedules.make_sigmas) this is diffusers' DDIMScheduler with
    set_alpha_to_one=False, clip_sample=False: the last step goes to step 0's sigma, so the result is x at
    that small noise level (the caller scales it by 1 / sqrt(1 + sigma^2) to get diffusers' latents).
    With eta > 0 every step draws unit noise (from `generator` or `noise_sampler(sigma, sigma_next)`).
    """
    noise_sampler = _noise_sampler(x, generator, noise_sampler, eta)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, i, x, "sigma", sigma, denoised)
        eps = (x - denoised) / sigma
        keep = 1 - (sigma_next / sigma) ** 2  # 1 - r
        sigma_up = eta * sigma_next * keep**0.5
        sigma_down = sigma_next * (1 - eta**2 * keep) ** 0.5
        x = denoised + sigma_down * eps
        if eta and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral DDPM: Ho et al. 2020, Algorithm 2, on a strided subset of timesteps.

    The posterior q(x_t' | x_t, x0) with "fixed_small" variance (eq. 6-7) between consecutive levels is,
    in our scaling (see sample_ddim's derivation), x' = x0 + (sigma'^2 / sigma) eps + sigma_up z with
    sigma_up^2 = sigma'^2 (1 - sigma'^2 / sigma^2): exactly DDIM with eta = 1. On the "ddpm"
    grid this is diffusers' DDPMScheduler.step (clip_sample=False), whose last step goes to alpha = 1
    (sigma 0: no noise; diffusers adds noise of std 1e-10 there, below float32 resolution).
    Unit noise comes from `generator`, or from noise_sampler(sigma, sigma_next).
    """
    if generator is None and noise_sampler is None:
        raise ValueError("DDPM needs a torch.Generator (or a noise_sampler)")
    return sample_ddim(
        denoiser, x, sigmas, generator=generator, callback=callback, noise_sampler=noise_sampler, eta=1.0
    )
