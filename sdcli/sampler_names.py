"""The sampler registry: our names ("dpmpp_2m_karras") and A1111's display names ("DPM++ 2M Karras")
mapped to a sampler function from `sdcli.samplers` and the sigma schedule or timestep grid it walks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdcli.errors import UsageError
from sdcli.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler: `fn(denoiser, x, sigmas)` with the grid it walks, `schedules.make_sigmas(schedule, ...)`.

    kind "sigma": a k-diffusion grid; kind "timestep": the sigmas of training timesteps (DDIM, DDPM).
    """

    name: str
    display_name: str
    fn: Callable[..., torch.Tensor]
    schedule: str
    kind: str


_SIGMA_SAMPLERS = (  # (our name, A1111 display name, function)
    ("euler", "Euler", sample_euler),
    ("euler_a", "Euler a", sample_euler_ancestral),
    ("heun", "Heun", sample_heun),
    ("dpm2", "DPM2", sample_dpm_2),
    ("dpm2_a", "DPM2 a", sample_dpm_2_ancestral),
    ("lms", "LMS", sample_lms),
    ("dpmpp_2s_a", "DPM++ 2S a", sample_dpmpp_2s_ancestral),
    ("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m),
    ("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde),
    ("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde),
)


def _build_registry() -> dict[str, SamplerSpec]:
    specs = []
    for name, display, fn in _SIGMA_SAMPLERS:
        specs.append(SamplerSpec(name, display, fn, "normal", "sigma"))
        specs.append(SamplerSpec(f"{name}_karras", f"{display} Karras", fn, "karras", "sigma"))
        specs.append(SamplerSpec(f"{name}_exponential", f"{display} Exponential", fn, "exponential", "sigma"))
    specs.append(SamplerSpec("ddim", "DDIM", sample_ddim, "leading", "timestep"))
    specs.append(SamplerSpec("ddpm", "DDPM", sample_ddpm, "leading_to_zero", "timestep"))
    return {spec.name: spec for spec in specs}


SAMPLERS: dict[str, SamplerSpec] = _build_registry()
# Lower-cased names and A1111 display names -> our name.
_ALIASES: dict[str, str] = {
    key.lower(): spec.name for spec in SAMPLERS.values() for key in (spec.name, spec.display_name)
}


def resolve_sampler(name: str) -> SamplerSpec:
    """The sampler for our name ("dpmpp_2m_karras") or an A1111 display name ("DPM++ 2M Karras"),
    case-insensitively. Raises UsageError listing the valid names otherwise."""
    key = " ".join(name.split()).lower()
    if key not in _ALIASES:
        raise UsageError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} "
            "(A1111 display names such as 'DPM++ 2M Karras' or 'Euler a' work too)"
        )
    return SAMPLERS[_ALIASES[key]]
