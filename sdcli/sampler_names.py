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
    """A named sampler: `fn` with the grid it walks.

    kind "sigma": fn(denoiser, x, sigmas) with sigmas from `schedules.make_sigmas(schedule, ...)`;
    kind "timestep": fn(eps_model, x, timesteps, alphas_cumprod) with `schedules.ddim_timesteps`
    (schedule "leading").
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
    specs.append(SamplerSpec("ddpm", "DDPM", sample_ddpm, "leading", "timestep"))
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
    from sdcli import samplers_fast

    specs = []
    for name, display, function, schedule, suffixed, _calls, _stochastic, _method in _FAST_SAMPLERS:
        fn = getattr(samplers_fast, function)
        specs.append(SamplerSpec(name, display, fn, schedule, "sigma"))
        if suffixed:
            specs.append(SamplerSpec(f"{name}_karras", f"{display} Karras", fn, "karras", "sigma"))
            specs.append(SamplerSpec(f"{name}_exponential", f"{display} Exponential", fn, "exponential", "sigma"))
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
        if key == spec.schedule:
            return spec
        raise UsageError(
            f"sampler {spec.name} walks its own {spec.schedule} timesteps and takes no other schedule; "
            f"drop the schedule or choose a sigma sampler such as euler or dpmpp_2m for {key}"
        )
    for suffix in ("_karras", "_exponential"):
        base = SAMPLERS.get(spec.name.removesuffix(suffix))
        if spec.name.endswith(suffix) and base is not None and base.fn is spec.fn:
            spec = base
    return replace(spec, schedule=key)
