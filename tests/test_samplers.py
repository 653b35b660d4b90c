"""Samplers equal k-diffusion's (sigma samplers) and diffusers' schedulers (DDIM, DDPM) given the same
model, grid and noise."""

import inspect
import math

import pytest
import scipy.integrate
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from kdiffusion_ref import load

from sdcli import samplers
from sdcli.denoiser import DiscreteDenoiser
from sdcli.sampler_names import SAMPLERS
from sdcli.samplers import lms_coefficient
from sdcli.schedules import alphas_cumprod_sd, make_sigmas, sigma_to_t, sigmas_from_alphas_cumprod

SHAPE = (2, 4, 6, 6)
FEATURES = math.prod(SHAPE[1:])
SD_SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
)


def _fixed(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MIXING = _fixed(1, FEATURES, FEATURES) * (1.5 / FEATURES**0.5)
BIAS = _fixed(2, FEATURES) * 0.3


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = tanh(A x / sqrt(sigma^2 + 1) + b): nonlinear in x and sigma, mixing every feature, so an error
    in any term of a step shows in the result."""
    assert sigma.shape == (x.shape[0],)
    c_in = (sigma**2 + 1) ** -0.5
    flat = x.flatten(1) * c_in[:, None]  # (B, F)
    # Row by row, so that an item's result does not depend on the batch it is in (a (B, F) matmul may
    # round differently for different B).
    mixed = torch.stack([MIXING @ row for row in flat])
    return torch.tanh(mixed + BIAS).view(x.shape)


def toy_eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear eps prediction that depends on the timestep."""
    scale = 0.5 + t.float() / 1000  # (B,)
    flat = x.flatten(1) * scale[:, None]
    return torch.tanh(flat @ MIXING.T - BIAS).view(x.shape)


class ListNoise:
    """A noise sampler that returns pre-drawn noises in order, so two samplers see identical noise."""

    def __init__(self, noises: list[torch.Tensor]) -> None:
        self.noises, self.calls = noises, 0

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        self.calls += 1
        return self.noises[self.calls - 1]


@pytest.fixture(scope="module")
def model_sigmas() -> torch.Tensor:
    return sigmas_from_alphas_cumprod(alphas_cumprod_sd())


# (ours, k-diffusion's name, takes a noise sampler)
SIGMA_CASES = [
    (samplers.sample_euler, "sample_euler", False),
    (samplers.sample_euler_ancestral, "sample_euler_ancestral", True),
    (samplers.sample_heun, "sample_heun", False),
    (samplers.sample_dpm_2, "sample_dpm_2", False),
    (samplers.sample_dpm_2_ancestral, "sample_dpm_2_ancestral", True),
    (samplers.sample_lms, "sample_lms", False),
    (samplers.sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", True),
    (samplers.sample_dpmpp_2m, "sample_dpmpp_2m", False),
    (samplers.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", True),
    (samplers.sample_dpmpp_sde, "sample_dpmpp_sde", True),
]


@pytest.mark.parametrize("schedule,steps", [("normal", 12), ("karras", 15), ("exponential", 10)])
@pytest.mark.parametrize("ours,reference_name,noisy", SIGMA_CASES, ids=[c[1] for c in SIGMA_CASES])
def test_sigma_sampler_equals_kdiffusion(ours, reference_name, noisy, schedule, steps, model_sigmas):
    sampling, _ = load()
    sigmas = make_sigmas(schedule, steps, model_sigmas)
    x = _fixed(3, *SHAPE) * sigmas[0]
    ours_seen, reference_seen = [], []
    kwargs_ours, kwargs_reference = {}, {}
    if noisy:
        noises = [_fixed(100 + k, *SHAPE) for k in range(2 * steps)]
        kwargs_ours["noise_sampler"] = ListNoise(noises)
        kwargs_reference["noise_sampler"] = ListNoise(noises)
    result = ours(toy_denoiser, x, sigmas, callback=ours_seen.append, **kwargs_ours)
    expected = getattr(sampling, reference_name)(
        toy_denoiser, x, sigmas, callback=reference_seen.append, disable=True, **kwargs_reference
    )
    assert (result - expected).abs().max().item() < 1e-5
    assert not torch.equal(result, x)
    if noisy:
        assert kwargs_ours["noise_sampler"].calls == kwargs_reference["noise_sampler"].calls > 0
    assert len(ours_seen) == len(reference_seen) == steps
    for mine, theirs in zip(ours_seen, reference_seen, strict=True):
        assert set(mine) == {"i", "x", "sigma", "denoised"}
        assert mine["i"] == theirs["i"] and mine["sigma"] == theirs["sigma"]
        assert (mine["denoised"] - theirs["denoised"]).abs().max().item() < 1e-5


def test_lms_coefficients_equal_quadrature_of_lagrange_basis():
    # Reference: scipy's adaptive quadrature of the Lagrange basis polynomial, all in float64.
    t = [14.6, 9.7, 6.1, 3.9, 2.2, 1.1, 0.45, 0.03]
    for i in range(3, 7):
        for order in (1, 2, 3, 4):
            for j in range(order):

                def basis(tau, i=i, order=order, j=j):
                    return math.prod((tau - t[i - k]) / (t[i - j] - t[i - k]) for k in range(order) if k != j)

                expected = scipy.integrate.quad(basis, t[i], t[i + 1], epsabs=0, epsrel=1e-13)[0]
                assert lms_coefficient(order, t, i, j) == pytest.approx(expected, rel=1e-11, abs=1e-13)
    # The coefficients of one step sum to the step length (they integrate the constant 1 exactly).
    assert sum(lms_coefficient(4, t, 5, j) for j in range(4)) == pytest.approx(t[6] - t[5], rel=1e-12)


STOCHASTIC = [
    samplers.sample_euler_ancestral,
    samplers.sample_dpm_2_ancestral,
    samplers.sample_dpmpp_2s_ancestral,
    samplers.sample_dpmpp_2m_sde,
    samplers.sample_dpmpp_sde,
]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda f: f.__name__)
def test_stochastic_sampler_noise_comes_only_from_generator(sampler, model_sigmas):
    sigmas = make_sigmas("karras", 6, model_sigmas)
    x = _fixed(3, *SHAPE) * sigmas[0]
    global_state = torch.random.get_rng_state()
    first = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    again = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    other = sampler(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    with pytest.raises(ValueError, match="Generator"):
        sampler(toy_denoiser, x, sigmas)
    # eta = 0 makes it deterministic, so no generator is needed.
    assert torch.isfinite(sampler(toy_denoiser, x, sigmas, eta=0.0)).all()


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda f: f.__name__)
def test_generator_list_makes_each_batch_item_reproducible_alone(sampler, model_sigmas):
    sigmas = make_sigmas("normal", 6, model_sigmas)
    x = _fixed(3, *SHAPE) * sigmas[0]
    batch = sampler(toy_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    alone = sampler(toy_denoiser, x[1:], sigmas, generator=[torch.Generator().manual_seed(8)])
    assert torch.equal(batch[1:], alone)
    other = sampler(toy_denoiser, x[1:], sigmas, generator=[torch.Generator().manual_seed(7)])
    assert (other - alone).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sampler(toy_denoiser, x, sigmas, generator=[torch.Generator() for _ in range(3)])


def test_every_sampler_takes_the_same_keywords():
    for spec in SAMPLERS.values():
        parameters = inspect.signature(spec.fn).parameters
        for keyword in ("generator", "callback", "noise_sampler"):
            assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (spec.name, keyword)


def test_default_noise_is_brownian_consistent_within_a_step():
    # Brownian increments over (10, 7) and (10, 5) overlap on (10, 7): correlation sqrt(3 / 5).
    x = torch.zeros(400_000)
    generator = torch.Generator().manual_seed(0)
    noise = samplers.IncrementNoise(lambda: torch.randn(x.shape, generator=generator))
    first = noise(torch.tensor(10.0), torch.tensor(7.0))
    second = noise(torch.tensor(10.0), torch.tensor(5.0))
    fresh = noise(torch.tensor(5.0), torch.tensor(2.0))
    assert first.std().item() == pytest.approx(1, abs=0.01)
    assert second.std().item() == pytest.approx(1, abs=0.01)
    assert (first * second).mean().item() == pytest.approx((3 / 5) ** 0.5, abs=0.01)
    assert (second * fresh).mean().item() == pytest.approx(0, abs=0.01)


def _diffusers_loop(scheduler, x, steps, generator, model=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    seen = []
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        seen.append(int(t))
        out = (model or toy_eps_model)(x, t_batch)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x, seen


def _timestep_run(sampler, model, alphas_cumprod, schedule, x_t, steps, prediction="eps", **kwargs):
    """Our DDIM/DDPM on `model` (a noise- or v-predicting network of (x_t, t)), started from the
    variance-preserving x_t as diffusers is, and the result brought back to that scaling: x = x_t * sqrt(1 +
    sigma^2) (see sample_ddim). Returns (result, grid, callback records)."""
    denoiser = DiscreteDenoiser(model, alphas_cumprod, prediction)
    sigmas = make_sigmas(schedule, steps, denoiser.sigmas)
    seen = []
    x = sampler(denoiser, x_t * (1 + sigmas[0] ** 2) ** 0.5, sigmas, callback=seen.append, **kwargs)
    return x / (1 + sigmas[-1] ** 2) ** 0.5, denoiser, seen


def _assert_fp32_close(result: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: the same maths in another scaling rounds differently, by a few ulps of
    the largest value per step (the toy model's x0 estimates reach tens)."""
    scale = expected.abs().max().item()
    assert (result - expected).abs().max().item() <= 2e-6 * max(scale, 1.0)


def _assert_timesteps(seen, denoiser, expected_ts):
    # The model saw exactly diffusers' training steps, as the sigmas of those steps.
    assert set(seen[0]) == {"i", "x", "sigma", "denoised"}
    assert [sigma_to_t(s["sigma"].view(1), denoiser.sigmas).item() for s in seen] == expected_ts


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(eta, prediction):
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, set_alpha_to_one=False, prediction_type=prediction_type)
    x = _fixed(4, *SHAPE)
    expected, expected_ts = _diffusers_loop(scheduler, x, 10, torch.Generator().manual_seed(5), eta=eta)
    result, denoiser, seen = _timestep_run(
        samplers.sample_ddim, toy_eps_model, scheduler.alphas_cumprod, "ddim", x, 10, prediction,
        eta=eta, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    _assert_fp32_close(result, expected)
    _assert_timesteps(seen, denoiser, expected_ts)


def test_ddim_with_ldm_alphas_cumprod_stays_close_to_diffusers():
    # Our float64-derived alphas_cumprod vs diffusers' float32 one: same trajectory up to that rounding.
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, set_alpha_to_one=False)
    x = _fixed(4, *SHAPE)
    expected, _ = _diffusers_loop(scheduler, x, 20, None)
    result, _, _ = _timestep_run(samplers.sample_ddim, toy_eps_model, alphas_cumprod_sd(), "ddim", x, 20)
    assert (result - expected).abs().max().item() < 1e-4


def test_ddpm_equals_diffusers_ddpm_scheduler():
    scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG, variance_type="fixed_small")
    x = _fixed(4, *SHAPE)
    expected, expected_ts = _diffusers_loop(scheduler, x, 12, torch.Generator().manual_seed(6))
    result, denoiser, seen = _timestep_run(
        samplers.sample_ddpm, toy_eps_model, scheduler.alphas_cumprod, "ddpm", x, 12,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    _assert_fp32_close(result, expected)
    _assert_timesteps(seen, denoiser, expected_ts)
    # The same draws through a noise_sampler give the same result.
    draws = torch.Generator().manual_seed(6)
    via_sampler, _, _ = _timestep_run(
        samplers.sample_ddpm, toy_eps_model, scheduler.alphas_cumprod, "ddpm", x, 12,
        noise_sampler=lambda sigma, sigma_next: torch.randn(SHAPE, generator=draws),
    )  # fmt: skip
    assert torch.equal(via_sampler, result)
    with pytest.raises(ValueError, match="Generator"):
        samplers.sample_ddpm(toy_denoiser, x, make_sigmas("ddpm", 3, denoiser.sigmas))
