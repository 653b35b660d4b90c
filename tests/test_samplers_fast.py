"""The few-step and higher-order samplers equal their references given the same denoiser, sigmas and noise:
k-diffusion's `sample_dpmpp_3m_sde`, and diffusers' LCMScheduler, TCDScheduler, UniPCMultistepScheduler,
DEISMultistepScheduler and IPNDMScheduler stepping the same model outputs.

diffusers' schedulers work in the variance-preserving scale x_vp = x / sqrt(1 + sigma^2) on eps (or, for
IPNDMScheduler, v) predictions, so the driver here converts: at each step x = x_vp sqrt(1 + sigma^2), x0 from
the denoiser, eps = (x - x0) / sigma (v = (eps - sigma_vp x_vp) / alpha). Each run starts from the same unit
noise (x_vp = noise, x = noise sqrt(1 + sigma_0^2)); stochastic ones draw from equal-seeded generators.
No reference is re-typed here: every sampler has one in k-diffusion 0.1.1 or diffusers. Parity is max abs
difference < 1e-5 in float32, except iPNDM (float64, < 1e-10; see its test). The registry entries and the
(sampler, schedule) pairs of `sdcli.sampler_names` are checked at the end.
"""

import math

import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    IPNDMScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from kdiffusion_ref import load
from test_samplers import ListNoise

from sdcli import samplers_fast
from sdcli.errors import UsageError
from sdcli.sampler_names import resolve_sampler, resolve_sampler_and_schedule
from sdcli.schedules import SCHEDULES, alphas_cumprod_sd, make_sigmas, sigmas_from_alphas_cumprod

SHAPE = (2, 4, 6, 6)
FEATURES = math.prod(SHAPE[1:])
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _fixed(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MIXING = _fixed(11, FEATURES, FEATURES) * (1.5 / FEATURES**0.5)
BIAS = _fixed(12, FEATURES) * 0.3


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = tanh(A x / sqrt(sigma^2 + 1) + b): nonlinear in x and sigma and mixing every feature."""
    assert sigma.shape == (x.shape[0],)
    flat = x.flatten(1) * ((sigma**2 + 1) ** -0.5)[:, None]
    mixing, bias = MIXING.to(x.dtype), BIAS.to(x.dtype)
    return torch.tanh(torch.stack([mixing @ row for row in flat]) + bias).view(x.shape)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _drive(scheduler, sigmas, output, dtype=torch.float32, **step_kwargs) -> torch.Tensor:
    """Run a diffusers scheduler from x_vp = unit noise, calling the denoiser at sigmas[i] for step i;
    `output(eps, x_vp, i)` turns the implied eps into the scheduler's model output."""
    x_vp = _fixed(3, *SHAPE).to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        x = x_vp * (1 + sigma**2) ** 0.5
        eps = (x - toy_denoiser(x, sigma * torch.ones(SHAPE[0], dtype=dtype))) / sigma
        x_vp = scheduler.step(output(eps, x_vp, i), t, x_vp, **step_kwargs).prev_sample
    return x_vp


def _start(sigma0, dtype=torch.float32) -> torch.Tensor:
    return _fixed(3, *SHAPE).to(dtype) * (1 + sigma0**2) ** 0.5


def _eps(eps, x_vp, i):
    return eps


def _model_sigmas(scheduler) -> torch.Tensor:
    return sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)


@pytest.mark.parametrize("schedule,steps", [("normal", 12), ("karras", 15), ("exponential", 9)])
def test_dpmpp_3m_sde_equals_kdiffusion(schedule, steps):
    sampling, _ = load()
    sigmas = make_sigmas(schedule, steps, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    x = _fixed(3, *SHAPE) * sigmas[0]
    noises = [_fixed(100 + k, *SHAPE) for k in range(steps)]
    ours_seen, reference_seen = [], []
    ours_noise, reference_noise = ListNoise(noises), ListNoise(noises)
    result = samplers_fast.sample_dpmpp_3m_sde(
        toy_denoiser, x, sigmas, noise_sampler=ours_noise, callback=ours_seen.append
    )
    expected = sampling.sample_dpmpp_3m_sde(
        toy_denoiser, x, sigmas, noise_sampler=reference_noise, callback=reference_seen.append, disable=True
    )
    assert _max_diff(result, expected) < 1e-5
    assert ours_noise.calls == reference_noise.calls == steps - 1
    assert [s["sigma"] for s in ours_seen] == [s["sigma"] for s in reference_seen]
    deterministic = samplers_fast.sample_dpmpp_3m_sde(toy_denoiser, x, sigmas, eta=0.0)
    expected = sampling.sample_dpmpp_3m_sde(toy_denoiser, x, sigmas, eta=0.0, disable=True)
    assert _max_diff(deterministic, expected) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_equals_diffusers_lcm_scheduler_with_its_boundary_condition(steps):
    # LCMScheduler folds the consistency boundary condition (c_skip, c_out with timestep_scaling 10) into each
    # step; in the D(x, sigma) contract that belongs to the denoiser, so ours gets the wrapped one.
    scheduler = LCMScheduler(**SD_CONFIG)
    scheduler.set_timesteps(steps)
    model_sigmas = _model_sigmas(scheduler)
    sigmas = make_sigmas("lcm", steps, model_sigmas)
    assert torch.equal(sigmas[:-1], model_sigmas[scheduler.timesteps])
    expected = _drive(scheduler, sigmas, _eps, generator=torch.Generator().manual_seed(5))
    seen = []
    wrapped = samplers_fast.lcm_boundary_condition(toy_denoiser, model_sigmas)
    result = samplers_fast.sample_lcm(
        wrapped, _start(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(5), callback=seen.append
    )
    assert _max_diff(result, expected) < 1e-5
    assert [s["i"] for s in seen] == list(range(steps))


def test_lcm_boundary_condition_is_nearly_identity_above_step_0():
    # For 4 steps (last timestep 259) the boundary condition moves x0 by ~1e-7: the plain denoiser matches too.
    scheduler = LCMScheduler(**SD_CONFIG)
    scheduler.set_timesteps(4)
    sigmas = make_sigmas("lcm", 4, _model_sigmas(scheduler))
    expected = _drive(scheduler, sigmas, _eps, generator=torch.Generator().manual_seed(5))
    result = samplers_fast.sample_lcm(
        toy_denoiser, _start(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(5)
    )
    assert _max_diff(result, expected) < 1e-5
    # At step 0 it is the identity skip: x0' = x_vp.
    wrapped = samplers_fast.lcm_boundary_condition(toy_denoiser, _model_sigmas(scheduler))
    x = _fixed(4, *SHAPE)
    sigma = _model_sigmas(scheduler)[0] * torch.ones(SHAPE[0])
    assert _max_diff(wrapped(x, sigma), x / (1 + sigma[0] ** 2) ** 0.5) < 1e-6


def test_lcm_single_step_needs_no_generator_and_returns_x0():
    sigmas = make_sigmas("lcm", 1, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    x = _start(sigmas[0])
    assert torch.equal(samplers_fast.sample_lcm(toy_denoiser, x, sigmas), toy_denoiser(x, sigmas[:1].repeat(2)))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_equals_diffusers_tcd_scheduler(gamma, steps):
    scheduler = TCDScheduler(**SD_CONFIG)
    scheduler.set_timesteps(steps)
    model_sigmas = _model_sigmas(scheduler)
    sigmas = make_sigmas("lcm", steps, model_sigmas)
    expected = _drive(scheduler, sigmas, _eps, eta=gamma, generator=torch.Generator().manual_seed(6))
    result = samplers_fast.sample_tcd(
        toy_denoiser,
        _start(sigmas[0]),
        sigmas,
        gamma=gamma,
        model_sigmas=model_sigmas,
        generator=torch.Generator().manual_seed(6),
    )
    assert _max_diff(result, expected) < 1e-5


def test_tcd_default_gamma_and_model_schedule():
    sigmas = make_sigmas("lcm", 4, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    x = _start(sigmas[0])
    default = samplers_fast.sample_tcd(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    explicit = samplers_fast.sample_tcd(
        toy_denoiser,
        x,
        sigmas,
        gamma=0.3,
        model_sigmas=sigmas_from_alphas_cumprod(alphas_cumprod_sd()),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(default, explicit)
    with pytest.raises(ValueError, match="gamma"):
        samplers_fast.sample_tcd(toy_denoiser, x, sigmas, gamma=1.5)


@pytest.mark.parametrize("steps,karras", [(1, False), (2, False), (3, False), (6, False), (20, False), (8, True)])
def test_uni_pc_equals_diffusers_unipc_scheduler(steps, karras):
    scheduler = UniPCMultistepScheduler(**SD_CONFIG, use_karras_sigmas=karras)
    assert scheduler.config.solver_type == "bh2" and scheduler.config.solver_order == 2
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(torch.float32)
    assert sigmas[-1] == 0
    expected = _drive(scheduler, sigmas, _eps)
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return toy_denoiser(x, sigma)

    result = samplers_fast.sample_uni_pc(counting, _start(sigmas[0]), sigmas)
    assert _max_diff(result, expected) < 1e-5
    assert calls == sigmas[:-1].tolist()  # one model call per step: the corrector reuses it


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps,karras", [(1, False), (3, False), (6, False), (20, False), (10, True)])
def test_deis_equals_diffusers_deis_scheduler(order, steps, karras):
    scheduler = DEISMultistepScheduler(**SD_CONFIG, solver_order=order, use_karras_sigmas=karras)
    scheduler.set_timesteps(steps)
    # diffusers evaluates the logrho weights from its float32 sigmas, where the third-order ones lose about four
    # digits to cancellation (~1e-4 in the image); given float64 sigmas it computes them as we do.
    sigmas = scheduler.sigmas.to(torch.float32)
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    expected = _drive(scheduler, sigmas, _eps)
    result = samplers_fast.sample_deis(toy_denoiser, _start(sigmas[0]), sigmas, order=order)
    # diffusers' DEIS stops at the smallest model sigma and returns x_vp there.
    assert _max_diff(result / (1 + sigmas[-1] ** 2) ** 0.5, expected) < 1e-5


def test_deis_to_sigma_zero_is_the_limit_of_small_final_sigmas():
    # Ending at 0 uses the limits of the logrho weights (they vanish like rho log(rho)^2): a tiny final sigma
    # gives almost the same image.
    model_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_sd())
    sigmas = make_sigmas("karras", 20, model_sigmas)
    x = _start(sigmas[0])
    to_zero = samplers_fast.sample_deis(toy_denoiser, x, sigmas)
    to_tiny = samplers_fast.sample_deis(toy_denoiser, x, torch.cat([sigmas[:-1], torch.tensor([1e-12])]))
    assert torch.isfinite(to_zero).all()
    assert _max_diff(to_zero, to_tiny) < 1e-6


@pytest.mark.parametrize("schedule,steps", [("karras", 10), ("normal", 3), ("exponential", 7)])
def test_ipndm_equals_diffusers_ipndm_scheduler(schedule, steps):
    # IPNDMScheduler walks sigma_vp = betas, alpha = sqrt(1 - betas^2) (v-diffusion's angle schedule). Given our
    # grid through trained_betas and v = (eps - sigma_vp x_vp) / alpha, it steps on eps = (x - x0) / sigma.
    # Compared in float64: on these grids float32 rounding alone moves either result by ~1e-4 from the float64
    # one (the toy model's tanh amplifies it), while in float64 the two agree to ~1e-13.
    grid = make_sigmas(schedule, steps, sigmas_from_alphas_cumprod(alphas_cumprod_sd())).double()
    scheduler = IPNDMScheduler(trained_betas=(grid / (1 + grid**2) ** 0.5).tolist())
    scheduler.set_timesteps(steps)
    scheduler.betas, scheduler.alphas = grid / (1 + grid**2) ** 0.5, (1 + grid**2) ** -0.5

    def v(eps, x_vp, i):
        return (eps - scheduler.betas[i] * x_vp) / scheduler.alphas[i]

    expected = _drive(scheduler, grid, v, dtype=torch.float64)
    result = samplers_fast.sample_ipndm(toy_denoiser, _start(grid[0], torch.float64), grid)
    assert _max_diff(result, expected) < 1e-10


def test_ipndm_steps_integrate_a_cubic_exactly_once_warmed_up():
    # With x0 = x - sigma p(sigma) the ODE is dx/dsigma = p(sigma), whatever x. Four-step Adams-Bashforth
    # integrates a cubic exactly over each equal step once four derivatives are known; the warm-up steps (lower
    # orders) do not, so wrong weights at any order would show.
    def p(s):
        return 0.3 * s**3 - s**2 + 2 * s - 1

    def integral(s):
        return 0.075 * s**4 - s**3 / 3 + s**2 - s

    sigmas = torch.linspace(4.0, 1.0, 13, dtype=torch.float64)
    seen = []
    result = samplers_fast.sample_ipndm(
        lambda x, sigma: x - sigma.view(-1, 1) * p(sigma.view(-1, 1)),
        torch.zeros(1, 1, dtype=torch.float64),
        sigmas,
        callback=seen.append,
    )
    xs = [s["x"].item() for s in seen] + [result.item()]
    errors = [xs[i + 1] - xs[i] - (integral(sigmas[i + 1].item()) - integral(sigmas[i].item())) for i in range(12)]
    assert all(abs(e) > 1e-4 for e in errors[:3])
    assert all(abs(e) < 1e-12 for e in errors[3:])


STOCHASTIC = [samplers_fast.sample_lcm, samplers_fast.sample_tcd, samplers_fast.sample_dpmpp_3m_sde]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda f: f.__name__)
def test_stochastic_noise_comes_only_from_the_generator(sampler):
    sigmas = make_sigmas("lcm", 4, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    x = _start(sigmas[0])
    state = torch.random.get_rng_state()
    first = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    again = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    other = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    with pytest.raises(ValueError, match="Generator"):
        sampler(toy_denoiser, x, sigmas)
    # One generator per batch item: an item's image does not depend on its batch.
    batch = sampler(toy_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    alone = sampler(toy_denoiser, x[1:], sigmas, generator=[torch.Generator().manual_seed(8)])
    assert torch.equal(batch[1:], alone)


def test_deterministic_samplers_ignore_the_generator():
    sigmas = make_sigmas("karras", 6, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    x = _start(sigmas[0])
    for sampler in (samplers_fast.sample_uni_pc, samplers_fast.sample_deis, samplers_fast.sample_ipndm):
        plain = sampler(toy_denoiser, x, sigmas)
        assert torch.equal(plain, sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1)))
        assert torch.isfinite(plain).all() and not torch.equal(plain, x)


# The registry: names, display names and (sampler, schedule) pairs.

FAST_NAMES = {
    "lcm": ("LCM", samplers_fast.sample_lcm, "lcm"),
    "tcd": ("TCD", samplers_fast.sample_tcd, "lcm"),
    "uni_pc": ("UniPC", samplers_fast.sample_uni_pc, "normal"),
    "uni_pc_bh2": ("UniPC", samplers_fast.sample_uni_pc, "normal"),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", samplers_fast.sample_dpmpp_3m_sde, "normal"),
    "DPM++ 3M SDE Karras": ("DPM++ 3M SDE Karras", samplers_fast.sample_dpmpp_3m_sde, "karras"),
    "dpmpp_3m_sde_exponential": ("DPM++ 3M SDE Exponential", samplers_fast.sample_dpmpp_3m_sde, "exponential"),
    "deis": ("DEIS", samplers_fast.sample_deis, "normal"),
    "ipndm": ("iPNDM", samplers_fast.sample_ipndm, "normal"),
    "iPNDM Karras": ("iPNDM Karras", samplers_fast.sample_ipndm, "karras"),
}


@pytest.mark.parametrize("name", FAST_NAMES)
def test_fast_samplers_are_registered(name):
    display, fn, schedule = FAST_NAMES[name]
    spec = resolve_sampler(name.upper())
    assert (spec.display_name, spec.fn, spec.schedule, spec.kind) == (display, fn, schedule, "sigma")


def test_schedule_overrides_the_samplers_grid():
    assert resolve_sampler_and_schedule("euler") is resolve_sampler("euler")
    spec = resolve_sampler_and_schedule("Euler a", "SGM Uniform")
    assert (spec.name, spec.fn, spec.schedule) == ("euler_a", resolve_sampler("euler_a").fn, "sgm_uniform")
    # A suffixed name stands for its base sampler once a schedule is given.
    spec = resolve_sampler_and_schedule("dpmpp_2m_karras", "exponential")
    assert (spec.name, spec.display_name, spec.schedule) == ("dpmpp_2m", "DPM++ 2M", "exponential")
    assert resolve_sampler_and_schedule("lcm", "karras").schedule == "karras"
    assert resolve_sampler_and_schedule("uni_pc", "trailing").name == "uni_pc"
    assert resolve_sampler("dpmpp_2m_karras").schedule == "karras"  # the registry itself is unchanged
    assert resolve_sampler_and_schedule("ddim", "leading") is resolve_sampler("ddim")


def test_bad_schedules_are_usage_errors():
    with pytest.raises(UsageError, match="unknown schedule 'linear'; valid schedules: normal, karras, .*, lcm"):
        resolve_sampler_and_schedule("euler", "linear")
    with pytest.raises(UsageError, match="ddim walks its own leading timesteps"):
        resolve_sampler_and_schedule("ddim", "karras")
    with pytest.raises(UsageError, match="unknown sampler"):
        resolve_sampler_and_schedule("eular", "karras")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["lcm", "tcd", "uni_pc", "dpmpp_3m_sde", "deis", "ipndm"])
def test_every_fast_sampler_runs_on_every_schedule(name, schedule):
    spec = resolve_sampler_and_schedule(name, schedule)
    sigmas = make_sigmas(spec.schedule, 4, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    result = spec.fn(toy_denoiser, _start(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result).all()
