"""Runs: jobs expanded into requests, batched through one loaded model, and written as PNGs atomically and
never over an existing file (unless asked), reported in the order of the jobs. Names: `sdcli.outputs`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from sdcli import __version__
from sdcli.checkpoint import StableDiffusion
from sdcli.errors import ImageError, SdcliError, UsageError
from sdcli.extra_networks import strip_extra_networks
from sdcli.images import (
    ResizeMode,
    feather_mask,
    load_image,
    load_mask,
    paste_unmasked,
    resize_to,
    save_png,
    size_multiple_of_8,
    to_pil,
)
from sdcli.infotext import format_infotext, schedule_label
from sdcli.jobs import Job
from sdcli.lora_sets import infotext_name, lora_hash
from sdcli.pipeline import generate
from sdcli.request import DEFAULTS, MAX_SEED, MIN_SIDE, GenerationRequest, parse_pair
from sdcli.sampler_names import resolve_sampler_and_schedule
from sdcli.weights import short_hash

if TYPE_CHECKING:
    from sdcli.embeddings import EmbeddingLibrary
    from sdcli.families import Family
    from sdcli.models.taesd import TinyAutoencoder

NAN_MESSAGE = (
    "the model produced NaN/inf values, so the image would be black: the checkpoint's weights may be damaged, "
    "or try --dtype fp32"
)


class Interrupted(Exception):
    """Raised from the sampling callback when the run was asked to stop; the batch in flight is dropped."""


@dataclass(frozen=True)
class Planned:
    """One image to make: its job, its request, where it goes, and the settings it was made from (init and
    mask paths, resize mode, ...: what the request holds only as pixels), for the record."""

    job: Job
    request: GenerationRequest
    target: Path
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    planned: Planned
    path: Path
    seconds: float


@dataclass(frozen=True)
class Failed:
    job: Job
    message: str


def load_inputs(
    init: Path,
    mask: Path | None,
    size: tuple[int | None, int | None],
    resize: ResizeMode = "crop",
    mask_blur: int = 4,
    invert_mask: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """The init image at the target size and, for inpainting, the feathered mask to match.

    Without a width and height the target is the init image's size rounded down to multiples of 8. A mask
    of another size than the init image is resized to it first, with a warning. Raises ImageError for an
    image too small to use without a size, UsageError for a size that is not positive.
    """
    image = load_image(init, warn)
    original_size = image.size
    width, height = size
    if width is None or height is None:
        w8, h8 = size_multiple_of_8(image.width, image.height)
        width = w8 if width is None else width
        height = h8 if height is None else height
        if min(width, height) < MIN_SIDE:
            raise ImageError(
                f"the init image {init} is {image.width}x{image.height}, which gives {width}x{height}: "
                f"images are at least {MIN_SIDE}x{MIN_SIDE}, so give --width and --height to scale it"
            )
    if width <= 0 or height <= 0:
        raise UsageError(f"width and height must be multiples of 8 of at least {MIN_SIDE}, got {width}x{height}")
    image = resize_to(image, width, height, resize)
    if mask is None:
        return image, None
    mask_image = load_mask(mask, warn)
    if mask_image.size != original_size:
        if warn is not None:
            warn(
                f"the mask is {mask_image.width}x{mask_image.height} but the init image is "
                f"{original_size[0]}x{original_size[1]}: resizing the mask to match"
            )
        mask_image = mask_image.resize(original_size, resample=Image.Resampling.LANCZOS)
    mask_image = resize_to(mask_image, width, height, resize)
    return image, feather_mask(mask_image, mask_blur, invert_mask)


def job_requests(
    values: dict,
    first_seed: int,
    warn: Callable[[str], None] | None = None,
    *,
    family: Family | None = None,
    max_images: int = DEFAULTS.max_images,
) -> list[GenerationRequest]:
    """The requests one job makes: `n` images with seeds first_seed, first_seed+1, ...; validated.

    `values` holds every setting (the run's options with the job's own on top); what none sets comes from
    DEFAULTS, and the size from the model `family` (or the init image). Given the family, the request is
    also checked against it (clip skip within its text encoder). Raises SdcliError.
    """
    n = values.get("n", DEFAULTS.n)
    if not 1 <= n <= max_images:
        raise UsageError(f"n must be between 1 and {max_images} (--max-images raises the limit), got {n}")
    if not 0 <= first_seed <= MAX_SEED - (n - 1):
        raise UsageError(
            f"seed must be between 0 and {MAX_SEED - (n - 1)} for {n} image{'s' if n != 1 else ''}, got {first_seed}"
        )
    default_size = family.default_size if family is not None else DEFAULTS.size
    width, height = values.get("width"), values.get("height")
    init, mask = values.get("init"), values.get("mask")
    if mask is not None and init is None:
        raise UsageError("a mask needs an init image")
    strength = values.get("strength")
    if strength is None:
        strength = 1.0 if init is None else DEFAULTS.strength("inpaint" if mask else "img2img")
    settings = dict(
        prompt=values["prompt"],
        negative=values.get("negative"),
        steps=values.get("steps", DEFAULTS.steps),
        cfg=float(values.get("cfg", DEFAULTS.cfg)),
        sampler=values.get("sampler", DEFAULTS.sampler),
        schedule=values.get("schedule"),
        seed=first_seed,
        clip_skip=values.get("clip_skip", DEFAULTS.clip_skip),
        strength=float(strength),
        mask_blur=values.get("mask_blur", 0) if mask else 0,
        loras=tuple(values.get("loras", ())),
        rng=values.get("rng", DEFAULTS.rng),
        original_size=_pair(values.get("original_size"), "x", "--original-size"),
        crop=_pair(values.get("crop"), ",", "--crop") or (0, 0),
        aesthetic_score=float(values.get("aesthetic_score", DEFAULTS.aesthetic_score)),
        negative_aesthetic_score=float(values.get("negative_aesthetic_score", DEFAULTS.negative_aesthetic_score)),
    )
    size = (default_size if width is None else width, default_size if height is None else height)
    GenerationRequest(**settings, width=size[0], height=size[1]).validate(family)  # before reading any image
    if init is None:
        first = GenerationRequest(**settings, width=size[0], height=size[1])
    else:
        init_image, mask_image = load_inputs(
            Path(init), Path(mask) if mask else None, (width, height), values.get("resize", DEFAULTS.resize),
            settings["mask_blur"], values.get("invert_mask", DEFAULTS.invert_mask), warn,
        )  # fmt: skip
        first = GenerationRequest(
            **settings, width=init_image.width, height=init_image.height, init=init_image, mask=mask_image
        )
        first.validate(family)
    return [first] + [replace(first, seed=first_seed + i) for i in range(1, n)]


def _pair(value: object, separator: str, what: str) -> tuple[int, int] | None:
    """A setting given as "WxH"/"X,Y" text or as a pair, as a pair of ints (None stays None)."""
    return parse_pair(value, separator, what) if isinstance(value, str) else (tuple(value) if value else None)


def infotext_parameters(
    request: GenerationRequest,
    model_hash: str,
    model_name: str,
    vae: Path | None = None,
    ti_hashes: str | None = None,
    family: Family | None = None,
) -> dict[str, object]:
    """The A1111 infotext key/value line for one image, in A1111's order; `vae`: the file of a VAE override,
    `ti_hashes`: the embeddings the prompts used (see sdcli.embeddings); then what the model `family` adds
    (beyond SD 1.x: the prediction type used; SDXL: its size conditioning; the refiner: its aesthetic scores)."""
    sampler, schedule = sampler_and_schedule_labels(request)
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": request.cfg,
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    if vae is not None:
        params.update({"VAE hash": short_hash(vae), "VAE": vae.name})
    if request.init is not None:
        params["Denoising strength"] = request.strength
    if request.mask is not None:
        params["Mask blur"] = request.mask_blur
    if request.clip_skip != 1:
        params["Clip skip"] = request.clip_skip
    if request.loras:
        params["Lora hashes"] = ", ".join(f"{infotext_name(r)}: {lora_hash(r.path)}" for r in request.loras)
    params["TI hashes"] = ti_hashes
    params["RNG"] = {"cpu": "CPU", "cuda": "NV"}[request.rng]  # A1111's names; it reads a missing one as GPU
    if family is not None and not family.name.startswith("sd1"):
        params["Prediction"] = family.prediction
    if family is not None and family.unet.adm_in_channels:
        height, width, top, left, _, _ = request.size_conditioning()
        params["Original size"] = f"{width}x{height}"
        params["Crop"] = f"{left},{top}"
    if family is not None and family.aesthetic_score:
        params["Aesthetic score"] = request.aesthetic_score
        params["Negative aesthetic score"] = request.negative_aesthetic_score
    params["Version"] = f"sdcli {__version__}"
    return params


def request_ti_hashes(request: GenerationRequest, embeddings: EmbeddingLibrary | None, family: Family) -> str | None:
    """A1111's `TI hashes` for the embeddings the request's prompt and negative prompt use (None for none).
    Raises CheckpointError for an embedding file that does not fit the `family`."""
    return embeddings.hashes((request.prompt, request.negative or ""), family) if embeddings else None


def png_parameters(
    request: GenerationRequest,
    model_hash: str,
    model_name: str,
    vae: Path | None = None,
    ti_hashes: str | None = None,
    family: Family | None = None,
) -> str:
    """The PNG "parameters" text an image is written with (what `--skip-existing` compares)."""
    params = infotext_parameters(request, model_hash, model_name, vae, ti_hashes, family)
    return format_infotext(request.prompt, request.negative, params)


def sampler_and_schedule_labels(request: GenerationRequest) -> tuple[str, str | None]:
    """The sampler's display name without its schedule, and the schedule's A1111 label (None for the timestep
    samplers DDIM and DDPM, which walk their own steps)."""
    spec = resolve_sampler_and_schedule(request.sampler, request.schedule)
    if spec.kind != "sigma":
        return spec.display_name, None
    base = resolve_sampler_and_schedule(spec.name, spec.schedule)  # a suffixed name stands for its base here
    return base.display_name, schedule_label(spec.schedule)


def batches(planned: list[Planned], batch_size: int) -> Iterator[list[tuple[int, Planned]]]:
    """Images that can share a UNet call (same size, steps, sampler, ...), in groups of at most `batch_size`,
    in the order their kind first appears, those with the same LoRAs together (a switch re-reads weights);
    each image with its place in `planned`."""
    groups: dict[tuple, list[tuple[int, Planned]]] = {}
    lora_order: dict[tuple, int] = {}
    for index, item in enumerate(planned):
        lora_order.setdefault(item.request.loras, len(lora_order))
        groups.setdefault(item.request.batch_key(), []).append((index, item))
    for group in sorted(groups.values(), key=lambda group: lora_order[group[0][1].request.loras]):
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _failed(chunk: list[tuple[int, Planned]], message: str) -> dict[int, Failed | None]:
    """One failure per job of a chunk, at the place of its first image; its other images report nothing."""
    results: dict[int, Failed | None] = {}
    seen: set[int] = set()
    for index, item in chunk:
        results[index] = None if id(item.job) in seen else Failed(item.job, message)
        seen.add(id(item.job))
    return results


def run(
    model: StableDiffusion,
    planned: list[Planned],
    *,
    batch_size: int = DEFAULTS.batch_size,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], object] = lambda: False,
    vae_tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
    embeddings: EmbeddingLibrary | None = None,
    use_loras: Callable[[tuple], None] | None = None,
    taesd: TinyAutoencoder | None = None,
) -> Iterator[Written | Failed]:
    """Generate and write every planned image; yields each one written, or each job that failed, in the
    order of `planned` (images are batched by settings, and held back until those before them are out).

    For inpainting, the pixels outside the feathered mask are pasted back from the init image. An image
    whose pixels are not finite fails with NAN_MESSAGE instead of being written black; running out of
    memory fails the batch's jobs with advice. An `Interrupted` raised by `on_step` drops the batch in
    flight (nothing half-written), reports what was written, and propagates; `should_stop` is asked before
    each batch. `use_loras(loras)` is called before each batch to put its requests' LoRA set in the weights.
    `taesd` replaces the model's VAE for encoding and decoding.
    """
    model_hash = short_hash(model.path)
    finished: dict[int, Written | Failed | None] = {}
    reported = 0

    def in_order() -> Iterator[Written | Failed]:
        nonlocal reported
        while reported in finished:
            result = finished.pop(reported)
            reported += 1
            if result is not None:
                yield result

    def held_back() -> Iterator[Written | Failed]:
        yield from (result for _, result in sorted(finished.items()) if result is not None)
        finished.clear()

    try:
        for chunk in batches(planned, batch_size):
            if should_stop():
                break
            if use_loras is not None:
                use_loras(chunk[0][1].request.loras)
            finished.update(_make(model, chunk, model_hash, overwrite, on_step, vae_tiling, warn, embeddings, taesd))
            yield from in_order()
    except Interrupted:
        yield from held_back()
        raise
    yield from held_back()


def _make(
    model: StableDiffusion,
    chunk: list[tuple[int, Planned]],
    model_hash: str,
    overwrite: bool,
    on_step: Callable[[dict], None] | None,
    vae_tiling: bool | None,
    warn: Callable[[str], None] | None,
    embeddings: EmbeddingLibrary | None = None,
    taesd: TinyAutoencoder | None = None,
) -> dict[int, Written | Failed | None]:
    """Generate one batch and write its images; the result of each image, by its place in the plan."""
    started = time.monotonic()
    requests = [item.request for _, item in chunk]
    try:  # the text encoder sees the prompts without their <lora:...> tags
        prompts = [replace(r, prompt=strip_extra_networks(r.prompt)) for r in requests]
        images = generate(
            model,
            prompts,
            callback=on_step,
            vae_tiling=vae_tiling,
            warn=warn,
            embeddings=embeddings,
            taesd=taesd,
        )
    except SdcliError as e:
        return _failed(chunk, str(e))
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        first = requests[0]
        return _failed(
            chunk,
            f"ran out of memory making {len(requests)} {first.width}x{first.height} image(s): try --vae-tiling, "
            "--low-memory, a smaller --batch-size or a smaller size",
        )
    seconds = (time.monotonic() - started) / len(chunk)
    finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
    results: dict[int, Written | Failed | None] = {}
    for (index, item), image, ok in zip(chunk, to_pil(images), finite, strict=True):
        if not ok:
            results.update(_failed([(index, item)], NAN_MESSAGE))
            continue
        request = item.request
        if request.mask is not None:
            image = paste_unmasked(image, request.init, request.mask)
        ti_hashes = request_ti_hashes(request, embeddings, model.family)
        text = png_parameters(request, model_hash, model.path.stem, model.vae_path, ti_hashes, model.family)
        try:
            results[index] = Written(item, save_png(image, item.target, text, overwrite=overwrite), seconds)
        except SdcliError as e:  # this image's file only: the other jobs still run
            results.update(_failed([(index, item)], str(e)))
    return results
