"""Runs: jobs expanded into requests, batched through one loaded model, and written as PNGs named by a
template, atomically and never over an existing file (unless asked)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image

from sdcli import __version__
from sdcli.checkpoint import StableDiffusion
from sdcli.errors import SdcliError, UsageError
from sdcli.images import (
    ResizeMode,
    feather_mask,
    format_infotext,
    load_image,
    load_mask,
    paste_unmasked,
    resize_to,
    save_png,
    size_multiple_of_8,
    to_pil,
)
from sdcli.jobs import Job
from sdcli.pipeline import MAX_SEED, GenerationRequest, generate
from sdcli.sampler_names import resolve_sampler
from sdcli.weights import short_hash

DEFAULT_OUTDIR = Path("outputs")
DEFAULT_NAME = "{index:05d}-{seed}"
NAME_FIELDS = ("index", "seed", "prompt", "sampler", "steps", "cfg", "width", "height", "model", "date", "time")
_LEADING_NUMBER = re.compile(r"^(\d+)-")


class Interrupted(Exception):
    """Raised from the sampling callback when the run was asked to stop; the batch in flight is dropped."""


@dataclass(frozen=True)
class Planned:
    """One image to make: its job, its request and where it goes."""

    job: Job
    request: GenerationRequest
    target: Path


@dataclass(frozen=True)
class Written:
    planned: Planned
    path: Path
    seconds: float


@dataclass(frozen=True)
class Failed:
    job: Job
    message: str


def next_index(outdir: Path) -> int:
    """The number after the highest `NNNNN-` prefix in `outdir`, so names keep counting across runs."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _LEADING_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def slug(text: str) -> str:
    """A prompt made safe as part of a file name: word characters kept, every other run of characters '-'."""
    return re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_") or "untitled"


def numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}-{number:04d}{path.suffix}")


class Namer:
    """Target paths: `--output` (numbered when a run makes several images) or `--outdir` with a template.

    Template fields: index (counting on from the highest number already in the folder), seed, prompt
    (a file-name-safe slug), sampler, steps, cfg, width, height, model, date, time.
    """

    def __init__(self, output: Path | None, outdir: Path | None, template: str | None, model_name: str) -> None:
        if output is not None and (outdir is not None or template is not None):
            raise UsageError("give either --output or --outdir/--name, not both")
        if output is not None and output.suffix.lower() != ".png":
            raise UsageError(f"--output must name a .png file, got {output}")
        self.output = output
        self.outdir = outdir or DEFAULT_OUTDIR
        self.template = template or DEFAULT_NAME
        self.model_name = model_name
        self.now = datetime.now()
        self.start = next_index(self.outdir) if output is None else 0
        self._render(0, GenerationRequest("prompt"))  # a bad template fails before anything runs

    def _render(self, index: int, request: GenerationRequest) -> str:
        fields = {
            "index": index, "seed": request.seed, "prompt": slug(request.prompt),
            "sampler": resolve_sampler(request.sampler).name, "steps": request.steps, "cfg": request.cfg,
            "width": request.width, "height": request.height, "model": self.model_name,
            "date": self.now.strftime("%Y-%m-%d"), "time": self.now.strftime("%H%M%S"),
        }  # fmt: skip
        try:
            name = self.template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"bad --name template {self.template!r} ({e}); fields: {', '.join(NAME_FIELDS)}") from None
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UsageError(f"--name {self.template!r} must give a plain file name, got {name!r}")
        return name if name.lower().endswith(".png") else name + ".png"

    def paths(self, requests: list[GenerationRequest], job_output: str | None, total: int, done: int) -> list[Path]:
        """Targets for one job's images; `done` images of the run's `total` came before them."""
        if job_output is not None:
            base = Path(job_output)
            return [base] if len(requests) == 1 else [numbered(base, i + 1) for i in range(len(requests))]
        if self.output is not None:
            if total == 1:
                return [self.output]
            return [numbered(self.output, done + i + 1) for i in range(len(requests))]
        return [self.outdir / self._render(self.start + done + i, r) for i, r in enumerate(requests)]


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
    of another size than the init image is resized to it first, with a warning.
    """
    image = load_image(init)
    original_size = image.size
    width, height = size
    if width is None or height is None:
        w8, h8 = size_multiple_of_8(image.width, image.height)
        width, height = width or w8, height or h8
    image = resize_to(image, width, height, resize)
    if mask is None:
        return image, None
    mask_image = load_mask(mask)
    if mask_image.size != original_size:
        if warn is not None:
            warn(
                f"the mask is {mask_image.width}x{mask_image.height} but the init image is "
                f"{original_size[0]}x{original_size[1]}: resizing the mask to match"
            )
        mask_image = mask_image.resize(original_size, resample=Image.Resampling.LANCZOS)
    mask_image = resize_to(mask_image, width, height, resize)
    return image, feather_mask(mask_image, mask_blur, invert_mask)


def job_requests(values: dict, first_seed: int, warn: Callable[[str], None] | None = None) -> list[GenerationRequest]:
    """The requests one job makes: `n` images with seeds first_seed, first_seed+1, ...; validated.

    `values` holds every setting (the run's options with the job's own on top). Raises SdcliError.
    """
    init_image = mask_image = None
    size = (values.get("width"), values.get("height"))
    if values.get("init") is not None:
        init_image, mask_image = load_inputs(
            Path(values["init"]), Path(values["mask"]) if values.get("mask") else None, size,
            values.get("resize", "crop"), values.get("mask_blur", 0), values.get("invert_mask", False), warn,
        )  # fmt: skip
        size = init_image.size
    elif values.get("mask") is not None:
        raise UsageError("a mask needs an init image")
    n = values.get("n", 1)
    if n < 1:
        raise UsageError(f"n must be 1 or more, got {n}")
    if not 0 <= first_seed <= MAX_SEED - (n - 1):
        raise UsageError(f"seed must be between 0 and {MAX_SEED - (n - 1)} for {n} images, got {first_seed}")
    requests = [
        GenerationRequest(
            prompt=values["prompt"],
            negative=values.get("negative", ""),
            width=size[0] or 512,
            height=size[1] or 512,
            steps=values.get("steps", 20),
            cfg=float(values.get("cfg", 7.5)),
            sampler=values.get("sampler", "DPM++ 2M Karras"),
            seed=first_seed + i,
            clip_skip=values.get("clip_skip", 1),
            init=init_image,
            mask=mask_image,
            strength=float(values.get("strength", 1.0)),
            mask_blur=values.get("mask_blur", 0) if mask_image else 0,
        )  # fmt: skip
        for i in range(n)
    ]
    requests[0].validate()
    return requests


def infotext_parameters(request: GenerationRequest, model_hash: str, model_name: str) -> dict[str, object]:
    """The A1111 infotext key/value line for one image, in A1111's order."""
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": resolve_sampler(request.sampler).display_name,
        "CFG scale": request.cfg,
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    if request.init is not None:
        params["Denoising strength"] = request.strength
    if request.mask is not None:
        params["Mask blur"] = request.mask_blur
    if request.clip_skip != 1:
        params["Clip skip"] = request.clip_skip
    params["Version"] = f"sdcli {__version__}"
    return params


def batches(planned: list[Planned], batch_size: int) -> Iterator[list[Planned]]:
    """Images that can share a UNet call (same size, steps, sampler, ...), in groups of at most `batch_size`,
    in the order their kind first appears."""
    groups: dict[tuple, list[Planned]] = {}
    for item in planned:
        groups.setdefault(item.request.batch_key(), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def run(
    model: StableDiffusion,
    planned: list[Planned],
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], object] = lambda: False,
    vae_tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[Written | Failed]:
    """Generate and write every planned image; yields each one written, or each job that failed.

    For inpainting, the pixels outside the feathered mask are pasted back from the init image. An
    `Interrupted` raised by `on_step` drops the batch in flight (nothing half-written) and propagates;
    `should_stop` is asked before each batch.
    """
    model_hash = short_hash(model.path)
    for chunk in batches(planned, batch_size):
        if should_stop():
            return
        started = time.monotonic()
        try:
            requests = [p.request for p in chunk]
            images = to_pil(generate(model, requests, callback=on_step, vae_tiling=vae_tiling, warn=warn))
        except SdcliError as e:
            for job in dict.fromkeys(p.job for p in chunk):
                yield Failed(job, str(e))
            continue
        seconds = (time.monotonic() - started) / len(chunk)
        for item, image in zip(chunk, images, strict=True):
            request = item.request
            if request.mask is not None:
                image = paste_unmasked(image, request.init, request.mask)
            text = format_infotext(
                request.prompt, request.negative, infotext_parameters(request, model_hash, model.path.stem)
            )
            yield Written(item, save_png(image, item.target, text, overwrite=overwrite), seconds)
