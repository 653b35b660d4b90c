"""The sampler registry resolves our names and A1111's display names to consistent specs."""

import pytest

from sdcli import samplers
from sdcli.errors import UsageError
from sdcli.sampler_names import SAMPLERS, SamplerSpec, resolve_sampler

A1111_NAMES = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 a": "dpm2_a",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "DPM2 Karras": "dpm2_karras",
    "DPM2 a Karras": "dpm2_a_karras",
    "DPM++ 2S a": "dpmpp_2s_a",
    "DPM++ 2S a Karras": "dpmpp_2s_a_karras",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ SDE Karras": "dpmpp_sde_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM++ 2M SDE Exponential": "dpmpp_2m_sde_exponential",
    "DDIM": "ddim",
    "DDPM": "ddpm",
}


@pytest.mark.parametrize("display,name", A1111_NAMES.items())
def test_a1111_display_names_resolve_case_insensitively(display, name):
    for spelling in (display, display.upper(), display.lower(), f"  {display.replace(' ', '  ')} "):
        assert resolve_sampler(spelling) is SAMPLERS[name]


def test_registry_specs_are_consistent():
    for name, spec in SAMPLERS.items():
        assert isinstance(spec, SamplerSpec) and spec.name == name
        assert resolve_sampler(name.upper()) is spec
        if spec.kind == "sigma":
            assert spec.schedule in ("normal", "karras", "exponential", "lcm")
            base = name.removesuffix("_karras").removesuffix("_exponential")
            assert SAMPLERS[base].fn is spec.fn and SAMPLERS[base].schedule in ("normal", "lcm")
        else:
            assert spec.kind == "timestep" and spec.schedule in ("ddim", "ddpm")
    assert resolve_sampler("dpmpp_2m_karras").fn is samplers.sample_dpmpp_2m
    assert resolve_sampler("DPM++ 2M Karras").schedule == "karras"
    assert resolve_sampler("ddim").fn is samplers.sample_ddim and resolve_sampler("ddpm").kind == "timestep"
    with pytest.raises(AttributeError):
        SAMPLERS["euler"].name = "other"


def test_unknown_sampler_is_usage_error_listing_valid_names():
    with pytest.raises(UsageError) as info:
        resolve_sampler("eular")
    message = str(info.value)
    assert "'eular'" in message
    for name in ("euler", "euler_a", "dpmpp_2m_karras", "dpmpp_2m_sde_exponential", "ddim", "ddpm"):
        assert name in message


def _run_counting(spec, seed: int, steps: int = 4):
    """Run the sampler on a toy denoiser; return (model calls, result)."""
    import torch

    from sdcli.schedules import make_sigmas, sigmas_from_alphas_cumprod, sigmas_karras

    calls = 0

    def model(x, level):
        nonlocal calls
        calls += 1
        return 0.3 * x

    x = torch.ones(1, 1, 2, 2)
    generator = torch.Generator().manual_seed(seed)
    if spec.kind == "timestep":
        from sdcli.schedules import alphas_cumprod_sd

        sigmas = make_sigmas(spec.schedule, steps, sigmas_from_alphas_cumprod(alphas_cumprod_sd()))
    else:
        sigmas = sigmas_karras(steps, 0.03, 14.6)
    result = spec.fn(model, x, sigmas, generator=generator)
    return calls, result


@pytest.mark.parametrize("name", [n for n in SAMPLERS if not n.endswith(("_karras", "_exponential"))])
def test_calls_per_step_and_stochastic_describe_what_the_function_does(name):
    spec = SAMPLERS[name]
    calls, first = _run_counting(spec, seed=1)
    # Two-call samplers take a single Euler step to sigma 0 at the end: steps * calls - (calls - 1).
    assert calls == spec.calls_per_step * 4 - (spec.calls_per_step - 1)
    _, other_seed = _run_counting(spec, seed=2)
    assert (not first.equal(other_seed)) == spec.stochastic
    assert ("stochastic" if spec.stochastic else "deterministic") in spec.description


@pytest.mark.parametrize(
    "spelling,name", [("dpm++2m", "dpmpp_2m"), ("dpm++2s_a", "dpmpp_2s_a"), ("euler_a", "euler_a")]
)
def test_stable_diffusion_cpp_names_resolve(spelling, name):
    assert resolve_sampler(spelling) is SAMPLERS[name]


def test_the_registry_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdcli.sampler_names as s; s.resolve_sampler('euler'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
