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
            assert spec.kind == "timestep" and spec.schedule == "leading"
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
