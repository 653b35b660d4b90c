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
    """A named sampler: the function `<module>.<function>` with the grid it walks.

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
    module: str = "sdcli.samplers"  # imported when the sampler is used, so the registry imports no torch

    @property
    def fn(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.function)

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
    specs.append(SamplerSpec("ddim", "DDIM", "sample_ddim", "ddim", "timestep", 1, False, "DDIM, eta 0"))
    specs.append(SamplerSpec("ddpm", "DDPM", "sample_ddpm", "ddpm", "timestep", 1, True, "ancestral DDPM"))
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


# Few-step and higher-order samplers from `sdcli.samplers_fast`, under our names (also ComfyUI's) and display names.
_FAST_SAMPLERS = (  # (our name, display name, function, default schedule, suffixed variants, model calls per step,
    # stochastic, method)
    ("lcm", "LCM", "sample_lcm", "lcm", False, 1, True, "latent consistency, multistep"),
    ("tcd", "TCD", "sample_tcd", "lcm", False, 1, True, "trajectory consistency, gamma 0.3"),
    ("uni_pc", "UniPC", "sample_uni_pc", "normal", True, 1, False, "UniPC bh2, order 2 with corrector"),
    ("dpmpp_3m_sde", "DPM++ 3M SDE", "sample_dpmpp_3m_sde", "normal", True, 1, True, "DPM-Solver++(3M) SDE"),
    ("deis", "DEIS", "sample_deis", "normal", True, 1, False, "DEIS logrho, order 3"),
    ("ipndm", "iPNDM", "sample_ipndm", "normal", True, 1, False, "improved PNDM, order 4"),
)
# Other spellings users type: ComfyUI's name for UniPC bh2.
_FAST_ALIASES = {"uni_pc_bh2": "uni_pc"}


def _fast_specs() -> list[SamplerSpec]:
    specs = []
    for name, display, function, schedule, suffixed, calls, stochastic, method in _FAST_SAMPLERS:
        details = (calls, stochastic, method, "sdcli.samplers_fast")
        specs.append(SamplerSpec(name, display, function, schedule, "sigma", *details))
        if suffixed:
            for suffix, grid in (("_karras", "karras"), ("_exponential", "exponential")):
                specs.append(
                    SamplerSpec(name + suffix, f"{display} {grid.capitalize()}", function, grid, "sigma", *details)
                )
    return specs


SAMPLERS.update({spec.name: spec for spec in _fast_specs()})
_ALIASES.update({key.lower(): spec.name for spec in SAMPLERS.values() for key in (spec.name, spec.display_name)})
_ALIASES.update(_FAST_ALIASES)


def resolve_sampler_and_schedule(name: str, schedule: str | None = None) -> SamplerSpec:
    """`resolve_sampler(name)`, with its grid replaced by `schedule` when one is given (our schedule names, any
    case, spaces for underscores: "SGM Uniform"). A suffixed name then stands for its base sampler
    ("dpmpp_2m_karras" with "exponential" is "dpmpp_2m" on the exponential grid). Timestep samplers (DDIM, DDPM)
    walk their own timesteps and accept only their own schedule. Raises UsageError for unknown names."""
    from dataclasses import replace

    from sdcli.schedules import SCHEDULES

    spec = resolve_sampler(name)
    if schedule is None:
        return spec
    key = "_".join(schedule.split()).lower()
    if key not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if spec.kind != "sigma":
        if key == "leading":  # the spacing of their own timesteps
            return spec
        raise UsageError(
            f"sampler {spec.name} walks its own leading timesteps and takes no other schedule; "
            f"drop the schedule or choose a sigma sampler such as euler or dpmpp_2m for {key}"
        )
    for suffix in ("_karras", "_exponential"):
        base = SAMPLERS.get(spec.name.removesuffix(suffix))
        if spec.name.endswith(suffix) and base is not None and base.fn is spec.fn:
            spec = base
    return replace(spec, schedule=key)
