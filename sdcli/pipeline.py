"""Generation as functions of (model, requests): prompts -> latents -> images. No printing, no CLI.

Every image has its own seed and its own noise stream (sdcli.image_noise): its initial noise is drawn
first, then any ancestral or SDE noise, so an image comes out the same alone or in a batch, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from sdcli.checkpoint import StableDiffusion
from sdcli.conditioning import TextConditioning
from sdcli.denoiser import DiscreteDenoiser, guided_unet
from sdcli.embeddings import EmbeddingLibrary
from sdcli.errors import UsageError
from sdcli.image_noise import BatchNoise
from sdcli.images import from_pil, save_png, to_pil
from sdcli.models.sdxl_size import sdxl_y
from sdcli.preview import SD_LATENT_RGB, SDXL_LATENT_RGB, approximate_rgb
from sdcli.prompt_encoding import ScheduledConditioning, encode_schedule
from sdcli.request import DEFAULTS, GenerationRequest
from sdcli.sampler_names import SamplerSpec
from sdcli.samplers import IncrementNoise
from sdcli.schedules import alphas_cumprod_sd, initial_noise_scale, make_sigmas
from sdcli.tiling import decode, encode

if TYPE_CHECKING:
    from sdcli.models.taesd import TinyAutoencoder


def encode_prompts(model: StableDiffusion, prompts: list[str], clip_skip: int = 1) -> TextConditioning:
    """Prompts -> their text conditioning (context (B, 77k, D), pooled) in float32 on the model's device.

    Read as AUTOMATIC1111 reads them (emphasis, chunks, BREAK; editing as at the first of one step); see
    sdcli.prompt_encoding.
    """
    return encode_schedule(model, prompts, 1, clip_skip).at(0)


def encode_negatives(
    model: StableDiffusion,
    requests: list[GenerationRequest],
    cond: ScheduledConditioning,
    embeddings: dict | None = None,
    steps: int | None = None,
) -> ScheduledConditioning:
    """The unconditional branch's conditioning over `steps` (default: the requests' steps): each request's
    negative prompt encoded; where none was given (None), "" encoded, or zeros (shaped as the prompts' `cond`)
    for families that zero a missing negative prompt (SDXL)."""
    first = requests[0]
    missing = [r.negative is None for r in requests]
    if model.family.zero_missing_negative and all(missing):
        return ScheduledConditioning(tuple(c.map(torch.zeros_like) for c in cond.batches), cond.step_batch)
    negatives = [r.negative or "" for r in requests]
    encoded = encode_schedule(model, negatives, steps or first.steps, first.clip_skip, embeddings)
    if not model.family.zero_missing_negative or not any(missing):
        return encoded
    kept = torch.tensor([not m for m in missing], dtype=torch.float32, device=model.device)
    batches = tuple(c.map(lambda t: t * kept.view(-1, *([1] * (t.ndim - 1)))) for c in encoded.batches)
    return ScheduledConditioning(batches, encoded.step_batch)


def add_size_conditioning(
    cond: ScheduledConditioning, requests: list[GenerationRequest], aesthetic: bool = False, negative: bool = False
) -> ScheduledConditioning:
    """SDXL: the pooled embeddings followed by each image's size embeddings, the UNet's `y`, at every step.

    `aesthetic`: the refiner's numbers (sizes and an aesthetic score: the negative one for the `negative`,
    unconditional branch) instead of the base model's six sizes.
    """
    numbers = [r.refiner_conditioning(negative) if aesthetic else r.size_conditioning() for r in requests]
    sizes = torch.tensor(numbers, dtype=torch.float32)  # (B, 6), or (B, 5) with an aesthetic score
    batches = tuple(TextConditioning(c.context, sdxl_y(c.pooled, sizes.to(c.pooled))) for c in cond.batches)
    return ScheduledConditioning(batches, cond.step_batch)


def _vae_dtype(model: StableDiffusion) -> torch.dtype:
    return next(model.vae.parameters()).dtype


def encode_images(
    model: StableDiffusion,
    images: torch.Tensor,
    noise: BatchNoise,
    tiling: bool | None = None,
    taesd: TinyAutoencoder | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents: a sample of the VAE's latent distribution.

    The sample's noise comes from each image's own stream (`BatchNoise.for_encoding`), so img2img stays
    reproducible from the seed alone. Large images (or `tiling`) are encoded in blended tiles. TAESD, when
    given, encodes instead (deterministic, whole images, no noise drawn).
    """
    if taesd is not None:
        return taesd.encode(images.to(model.device, model.dtype)).float()
    with model.use(model.vae) as vae:
        mean, logvar = encode(vae, images.to(model.device, _vae_dtype(model)), tiling=tiling)
    eps = noise.for_encoding(tuple(mean.shape[1:]), model.device)
    return (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * model.family.scale_factor


def decode_latents(
    model: StableDiffusion,
    latents: torch.Tensor,
    tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
    taesd: TinyAutoencoder | None = None,
) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images in [-1, 1] (B, 3, 8h, 8w), float32.

    Tiled when asked, for large images, or after running out of memory; a half-precision decode that
    overflows is redone in fp32 (see sdcli.tiling.decode). TAESD, when given, decodes instead (whole images).
    """
    if taesd is not None:
        return taesd.decode(latents.to(model.device, model.dtype)).float().clamp(-1, 1)
    z = (latents / model.family.scale_factor).to(_vae_dtype(model))
    with model.use(model.vae) as vae:
        return decode(vae, z, tiling=tiling, warn=warn).clamp(-1, 1)


@dataclass
class ImageStart:
    """Where img2img and inpainting start: the image's latents, and what of it to keep or show the UNet."""

    init_latents: torch.Tensor | None = None  # img2img / inpaint start, scaled latents
    strength: float = 1.0
    extra_channels: torch.Tensor | None = None  # inpainting UNets: latent mask + masked-image latents
    keep_mask: torch.Tensor | None = None  # regular UNets inpainting: 1 where the original is kept


def sample(
    model: StableDiffusion,
    spec: SamplerSpec,
    steps: int,
    cond: TextConditioning | ScheduledConditioning,
    uncond: TextConditioning | ScheduledConditioning | None,
    cfg: float,
    noise: torch.Tensor,
    streams: BatchNoise,
    start: ImageStart | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run `spec` over the last `strength` of a `steps`-step schedule; returns the final scaled latents.

    Without an init image, or at strength 1, sampling starts from pure noise; otherwise from the init
    latents noised to the first remaining level (diffusers' and A1111's img2img: strength 0.75 of 20 steps
    runs the last 15). `noise` is the initial noise; the sampler's own noise calls draw from `streams`. With a
    keep mask, every denoiser call after the first sees the kept area replaced by the original noised to that
    call's level, and the result keeps the original latents there.
    """
    c = start or ImageStart()
    dtype = model.dtype
    forward = model.compiled_unet or model.unet

    def unet(x: torch.Tensor, t: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        if c.extra_channels is not None:
            x = torch.cat([x, c.extra_channels.repeat(x.shape[0] // c.extra_channels.shape[0], 1, 1, 1)], dim=1)
        text = text.to(dtype)
        # SD 1.x/2.x UNets take the context; a UNet with a label embedding (SDXL) also takes `pooled` as its y.
        inputs = (text.context,) if text.pooled is None else (text.context, text.pooled)
        return forward(x.to(dtype), t, *inputs).float()

    # Prompt editing: the conditioning of the model call in progress, counted from 0 as A1111's CFGDenoiser
    # counts them (see `schedule_steps`).
    conds = [c if isinstance(c, ScheduledConditioning) else ScheduledConditioning((c,), (0,)) for c in (cond, uncond)]
    guided: dict[tuple[int, int], Callable] = {}
    calls = 0

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        key = (conds[0].index_at(calls), 0 if uncond is None else conds[1].index_at(calls))
        calls += 1
        if key not in guided:
            negative = None if uncond is None else conds[1].batches[key[1]]
            guided[key] = guided_unet(unet, conds[0].batches[key[0]], negative, cfg)
        return guided[key](x, t)

    # The schedule stays on the CPU: samplers compare sigmas in Python, which would otherwise wait for the GPU.
    alphas_cumprod = alphas_cumprod_sd()
    from_image = c.init_latents is not None and c.strength < 1.0
    skipped = steps - min(int(steps * c.strength), steps) if from_image else 0
    init = c.init_latents if c.init_latents is not None else torch.zeros_like(noise)
    keep = c.keep_mask

    def kept(x: torch.Tensor, noised_init: torch.Tensor) -> torch.Tensor:
        return keep * noised_init + (1 - keep) * x

    denoiser = DiscreteDenoiser(predict, alphas_cumprod, model.family.prediction)
    sigmas = make_sigmas(spec.schedule, steps, denoiser.sigmas)[skipped:]
    if len(sigmas) < 2:
        return init
    x = init + noise * sigmas[0] if from_image else noise * initial_noise_scale(spec.schedule, sigmas[0])
    sigma_start = sigmas[0].item()

    denoise = denoiser
    if keep is not None:

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if sigma[0].item() >= sigma_start:  # the start is left as it is (pure noise at strength 1, as diffusers)
                return denoiser(x, sigma)
            return denoiser(kept(x, init + noise * sigma.view(-1, 1, 1, 1)), sigma)

    # Each image's ancestral/SDE noise continues its own stream, after its initial noise.
    noise_sampler = IncrementNoise(lambda: streams.next(noise.shape[1:], noise.device))
    x = spec.fn(denoise, x, sigmas, noise_sampler=noise_sampler, callback=callback)
    # DDIM's grid ends at a small sigma rather than 0; its latents are x in the variance-preserving scaling
    # there, as diffusers and LDM decode them (for every other sampler this divides by 1).
    x = x / (1 + sigmas[-1] ** 2) ** 0.5
    return x if keep is None else kept(x, init)


def schedule_steps(spec: SamplerSpec, steps: int) -> int:
    """The steps prompt editing is resolved over: A1111 counts model calls, and for the samplers that call the
    model twice a step (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE: its "second order" ones) schedules over twice
    the steps. So `[a:b:0.5]` switches halfway through the calls, and `[a:b:10]` at the 10th call: step 5."""
    return steps * spec.calls_per_step


def prepare_image_start(
    model: StableDiffusion,
    requests: list[GenerationRequest],
    noise: BatchNoise,
    tiling: bool | None = None,
    taesd: TinyAutoencoder | None = None,
) -> ImageStart | None:
    """Encode the init images and masks of a batch into what `sample` needs (with TAESD when given)."""
    first = requests[0]
    if first.init is None:
        return None
    images = torch.cat([from_pil(r.init) for r in requests])  # (B, 3, H, W) in [-1, 1]
    c = ImageStart(init_latents=encode_images(model, images, noise, tiling, taesd), strength=first.strength)
    if first.mask is None:
        return c
    # The feathered mask, thresholded at half as diffusers does, then nearest-downsampled to latent size.
    masks = torch.cat([mask_tensor(r.mask) for r in requests])  # (B, 1, H, W) in [0, 1]
    repaint = (masks >= 0.5).float()
    latent_repaint = F.interpolate(repaint, size=c.init_latents.shape[-2:]).to(model.device)
    if model.family.is_inpainting:
        masked = encode_images(model, images * (1 - repaint), noise, tiling, taesd)  # the repainted area blanked
        c.extra_channels = torch.cat([latent_repaint, masked], dim=1)
    else:
        c.keep_mask = 1 - latent_repaint
    return c


@torch.inference_mode()
def generate(
    model: StableDiffusion,
    requests: list[GenerationRequest],
    callback: Callable[[dict], None] | None = None,
    vae_tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
    embeddings: EmbeddingLibrary | None = None,
    taesd: TinyAutoencoder | None = None,
) -> torch.Tensor:
    """Generate one image per request, as one batch: txt2img, img2img (init) or inpaint (init and mask).

    Returns images in [-1, 1] (B, 3, H, W), float32, on the CPU, before any paste-back of kept pixels.
    `vae_tiling`: True/False forces tiled VAE encode/decode on or off; None decides by free memory.
    `embeddings`: where the prompts' textual-inversion words are looked up (none without it).
    `taesd` encodes and decodes instead of the model's VAE. A cfg of 1 or less means no guidance: the
    unconditional half is not run (as diffusers, which guides only above 1; A1111 skips it only at exactly 1
    and below 1 blends the prompt's prediction with the unconditional one).
    """
    first = requests[0]
    spec = first.validate(model.family)
    if any(r.batch_key() != first.batch_key() for r in requests):
        raise ValueError("requests in one batch must share size, steps, cfg, sampler, clip skip and mode")
    if first.mask is not None and first.init is None:
        raise ValueError("a mask needs an init image")
    if model.family.is_inpainting and first.mask is None:
        raise UsageError(f"{model.path.name} is an inpainting model: use `sdcli inpaint` with --init and --mask")
    texts = [text for r in requests for text in (r.prompt, r.negative or "")]
    found = {} if embeddings is None else embeddings.used_in(texts, model.family)
    vectors = {name: embedding.vectors for name, embedding in found.items()}
    steps = schedule_steps(spec, first.steps)
    cond = encode_schedule(model, [r.prompt for r in requests], steps, first.clip_skip, vectors)
    uncond = None if first.cfg <= 1.0 else encode_negatives(model, requests, cond, vectors, steps)
    if model.family.unet.adm_in_channels:
        aesthetic = model.family.aesthetic_score
        cond = add_size_conditioning(cond, requests, aesthetic)
        uncond = None if uncond is None else add_size_conditioning(uncond, requests, aesthetic, negative=True)
    f = model.vae.downscale
    streams = BatchNoise([r.seed for r in requests], [r.rng for r in requests])
    shape = (model.family.unet.out_channels, first.height // f, first.width // f)
    noise = streams.next(shape, model.device)
    start = prepare_image_start(model, requests, streams, vae_tiling, taesd)
    with model.use(model.unet):
        latents = sample(model, spec, first.steps, cond, uncond, first.cfg, noise, streams, start, callback)
    if callback is not None:
        callback({"stage": "decode"})  # for progress, and a last chance to stop before the VAE's long pass
    return decode_latents(model, latents, vae_tiling, warn, taesd).cpu()


def preview_writer(
    model: StableDiffusion,
    path: Path,
    every: int = DEFAULTS.preview_every,
    taesd: TinyAutoencoder | None = None,
) -> Callable[[dict], None]:
    """A sampler callback that every `every` steps writes the current denoised estimate to `path` as a PNG,
    replacing the previous one atomically, so a viewer never sees half a file.

    The estimate goes through TAESD's decoder when given (the image's size), else through the linear
    latent-to-RGB approximation, scaled up 8x (nearest). The images of a batch are shown side by side.
    Only reads the sampler's "denoised": the images made are the same with or without previews.
    """
    factors = SDXL_LATENT_RGB if model.family.name.startswith("sdxl") else SD_LATENT_RGB

    def write(info: dict) -> None:
        denoised = info.get("denoised")
        if denoised is None or (info["i"] + 1) % every:
            return
        if taesd is not None and taesd.decoder is not None:
            images = taesd.decode(denoised.to(model.device, model.dtype)).float()
        else:
            rgb = approximate_rgb(denoised.float(), factors)
            images = F.interpolate(rgb, scale_factor=model.vae.downscale, mode="nearest")
        row = torch.cat(list(images.clamp(-1, 1).cpu()), dim=-1).unsqueeze(0)  # (1, 3, H, B * W)
        save_png(to_pil(row)[0], path, overwrite=True)

    return write


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An "L" mask -> (1, 1, H, W) float in [0, 1], 1 = repaint."""
    pixels = torch.frombuffer(bytearray(mask.convert("L").tobytes()), dtype=torch.uint8)
    return pixels.float().view(1, 1, mask.height, mask.width) / 255


def compile_unet(model: StableDiffusion, warn: Callable[[str], None]) -> None:
    """Run the UNet through torch.compile from now on, falling back to eager mode where that fails.

    Compilation happens at the first call (tens of seconds; worth it for long batches) and can fail in
    ways that depend on the platform (no C++ compiler, an unsupported backend), hence the fallback.
    On the CPU the weights are frozen into the graph as constants, which lets inductor pre-pack them for
    oneDNN (a 256x256 UNet step 21% faster than eager in one measurement, bench/RESULTS.md).
    """
    options = {"freezing": True} if model.device.type == "cpu" else None
    compiled = torch.compile(model.unet, options=options)

    def forward(*args: torch.Tensor) -> torch.Tensor:
        if model.compiled_unet is forward:
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compile failure means: run uncompiled
                warn(f"--compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); running uncompiled")
                model.compiled_unet = None
        return model.unet(*args)

    model.compiled_unet = forward
