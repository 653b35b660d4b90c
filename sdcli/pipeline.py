"""Generation as functions of (model, requests): prompts -> latents -> images. No printing, no CLI.

Every image has its own seed and its own CPU generator: its initial noise is drawn first, then any
ancestral or SDE noise, so an image comes out the same alone or in a batch, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdcli.checkpoint import StableDiffusion
from sdcli.denoiser import DiscreteDenoiser, guided_unet
from sdcli.errors import UsageError
from sdcli.samplers import SamplerSpec, resolve_sampler
from sdcli.schedules import alphas_cumprod_sd, ddim_timesteps, make_sigmas

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. Requests that share size, steps, cfg and sampler can run as one batch."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "DPM++ 2M Karras"
    seed: int = 0
    clip_skip: int = 1

    def validate(self) -> SamplerSpec:
        """Check the numbers a user typed; return the resolved sampler. Raises UsageError."""
        for name, value in (("width", self.width), ("height", self.height)):
            if value < 64 or value % 8:
                raise UsageError(f"{name} must be a multiple of 8 and at least 64, got {value}")
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"steps must be between 1 and 1000, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.clip_skip < 1:
            raise UsageError(f"clip skip must be 1 or more, got {self.clip_skip}")
        return resolve_sampler(self.sampler)

    def batch_key(self) -> tuple:
        return (self.width, self.height, self.steps, self.cfg, self.sampler.lower(), self.clip_skip)


def encode_prompts(model: StableDiffusion, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """Prompts -> text embeddings (B, 77, D) in float32 on the model's device."""
    ids = model.tokenizer(prompts).to(model.device)
    return model.text_encoder(ids, clip_skip=clip_skip).float()


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One unit Gaussian of `shape` (C, h, w) per generator, drawn on the CPU, stacked (B, C, h, w)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def decode_latents(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images in [-1, 1] (B, 3, 8h, 8w), float32."""
    z = (latents / model.family.scale_factor).to(model.dtype)
    return model.vae.decode(z).float().clamp(-1, 1)


def sample(
    model: StableDiffusion,
    spec: SamplerSpec,
    steps: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg: float,
    noise: torch.Tensor,
    generators: list[torch.Generator],
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run `spec` from pure noise for `steps` steps; returns the final scaled latents (float32)."""
    dtype = model.dtype

    def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return model.unet(x.to(dtype), t, context.to(dtype)).float()

    predict = guided_unet(unet, cond, uncond, cfg)
    alphas_cumprod = alphas_cumprod_sd().to(noise.device)
    # One generator per image: its ancestral/SDE noise continues from its initial noise.
    if spec.kind == "timestep":
        timesteps = ddim_timesteps(steps)
        return spec.fn(predict, noise, timesteps, alphas_cumprod, generator=generators, callback=callback)
    denoiser = DiscreteDenoiser(predict, alphas_cumprod, model.family.prediction)
    sigmas = make_sigmas(spec.schedule, steps, denoiser.sigmas)
    return spec.fn(denoiser, noise * sigmas[0], sigmas, generator=generators, callback=callback)


@torch.inference_mode()
def txt2img(
    model: StableDiffusion, requests: list[GenerationRequest], callback: Callable[[dict], None] | None = None
) -> torch.Tensor:
    """Generate one image per request, as one batch; returns images in [-1, 1] (B, 3, H, W), float32, CPU."""
    first = requests[0]
    spec = first.validate()
    if any(r.batch_key() != first.batch_key() for r in requests):
        raise ValueError("requests in one batch must share size, steps, cfg, sampler and clip skip")
    cond = encode_prompts(model, [r.prompt for r in requests], first.clip_skip)
    uncond = None if first.cfg == 1.0 else encode_prompts(model, [r.negative for r in requests], first.clip_skip)
    f = model.vae.downscale
    generators = seeded_generators([r.seed for r in requests])
    noise = draw_noise(generators, (model.family.unet.out_channels, first.height // f, first.width // f), model.device)
    latents = sample(model, spec, first.steps, cond, uncond, first.cfg, noise, generators, callback)
    return decode_latents(model, latents).cpu()
