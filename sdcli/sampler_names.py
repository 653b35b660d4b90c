"""The sampler registry: our names ("dpmpp_2m_karras") and A1111's display names ("DPM++ 2M Karras")
mapped to a sampler function from `sdcli.samplers` and the sigma schedule or timestep grid it walks.

Imports no torch: listing and completing sampler names stays instant; the function is imported on use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from sdcli.errors import UsageError


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler: the function `sdcli.samplers.<function>` with the grid it walks.

    Every sampler is `fn(denoiser, x, sigmas)` with sigmas from `schedules.make_sigmas(schedule, ...)`: kind
    "sigma" walks a k-diffusion grid, kind "timestep" the sigmas of training timesteps (DDIM, DDPM).
    `calls_per_step` counts model evaluations per step (the last step of the two-call samplers takes one);
    `stochastic` samplers add fresh noise from the image's generator.
    """

    name: str
    display_name: str
    function: str
    schedule: str
    kind: str
    calls_per_step: int
    stochastic: bool
    method: str  # a few words for `sdcli samplers`

    @property
    def fn(self) -> Callable:
        return getattr(importlib.import_module("sdcli.samplers"), self.function)

    @property
    def description(self) -> str:
        randomness = "stochastic" if self.stochastic else "deterministic"
        calls = "1 model call" if self.calls_per_step == 1 else f"{self.calls_per_step} model calls"
        return f"{self.method}; {randomness}, {calls} per step"


_SIGMA_SAMPLERS = (  # (our name, A1111 display name, function, calls per step, stochastic, method)
    ("euler", "Euler", "sample_euler", 1, False, "Euler"),
    ("euler_a", "Euler a", "sample_euler_ancestral", 1, True, "ancestral Euler"),
    ("heun", "Heun", "sample_heun", 2, False, "Heun, 2nd order"),
    ("dpm2", "DPM2", "sample_dpm_2", 2, False, "DPM-Solver-2"),
    ("dpm2_a", "DPM2 a", "sample_dpm_2_ancestral", 2, True, "DPM-Solver-2, ancestral"),
    ("lms", "LMS", "sample_lms", 1, False, "linear multistep, order 4"),
    ("dpmpp_2s_a", "DPM++ 2S a", "sample_dpmpp_2s_ancestral", 2, True, "DPM-Solver++(2S), ancestral"),
    ("dpmpp_2m", "DPM++ 2M", "sample_dpmpp_2m", 1, False, "DPM-Solver++(2M)"),
    ("dpmpp_sde", "DPM++ SDE", "sample_dpmpp_sde", 2, True, "DPM-Solver++ SDE"),
    ("dpmpp_2m_sde", "DPM++ 2M SDE", "sample_dpmpp_2m_sde", 1, True, "DPM-Solver++(2M) SDE"),
)


def _build_registry() -> dict[str, SamplerSpec]:
    specs = []
    for name, display, function, calls, stochastic, method in _SIGMA_SAMPLERS:
        for suffix, schedule in (("", "normal"), ("_karras", "karras"), ("_exponential", "exponential")):
            label = f" {schedule.capitalize()}" if suffix else ""
            specs.append(
                SamplerSpec(name + suffix, display + label, function, schedule, "sigma", calls, stochastic, method)
            )
    specs.append(SamplerSpec("ddim", "DDIM", "sample_ddim", "leading", "timestep", 1, False, "DDIM, eta 0"))
    specs.append(SamplerSpec("ddpm", "DDPM", "sample_ddpm", "leading_to_zero", "timestep", 1, True, "ancestral DDPM"))
    return {spec.name: spec for spec in specs}


SAMPLERS: dict[str, SamplerSpec] = _build_registry()
# Lower-cased names and A1111 display names -> our name.
_ALIASES: dict[str, str] = {
    key.lower(): spec.name for spec in SAMPLERS.values() for key in (spec.name, spec.display_name)
}


def resolve_sampler(name: str) -> SamplerSpec:
    """The sampler for our name ("dpmpp_2m_karras"), an A1111 display name ("DPM++ 2M Karras") or a
    stable-diffusion.cpp name ("dpm++2m"), case-insensitively. Raises UsageError listing the valid names
    otherwise."""
    key = " ".join(name.split()).lower()
    key = key if key in _ALIASES else key.replace("dpm++", "dpmpp_")  # stable-diffusion.cpp spells dpm++2m
    if key not in _ALIASES:
        raise UsageError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} "
            "(A1111 display names such as 'DPM++ 2M Karras' or 'Euler a' work too; `sdcli samplers` lists them)"
        )
    return SAMPLERS[_ALIASES[key]]
