"""Runs: jobs expanded into requests, batched through one loaded model, and written as PNGs named by a
template, atomically and never over an existing file (unless asked), reported in the order of the jobs."""

from __future__ import annotations

import re
import string
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from sdcli import __version__
from sdcli.checkpoint import StableDiffusion
from sdcli.errors import ImageError, SdcliError, UsageError
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
from sdcli.infotext import format_infotext
from sdcli.jobs import Job
from sdcli.pipeline import generate
from sdcli.request import DEFAULTS, MAX_SEED, MIN_SIDE, GenerationRequest
from sdcli.sampler_names import resolve_sampler
from sdcli.weights import short_hash

if TYPE_CHECKING:
    from sdcli.families import Family

DEFAULT_OUTDIR = Path("outputs")
DEFAULT_NAME = "{index:05d}-{seed}"
NAME_FIELDS = ("index", "seed", "prompt", "sampler", "steps", "cfg", "width", "height", "model", "date", "time")
MAX_NAME_BYTES = 255  # what ext4, APFS and NTFS allow for one file name
MAX_PROMPT_IN_NAME = 120  # bytes of the prompt's slug in a name, so a long prompt still gives a legal name
_LEADING_NUMBER = re.compile(r"^(\d+)-")
# Python's format spec without nested fields: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


def next_index(outdir: Path) -> int:
    """The number after the highest `NNNNN-` prefix in `outdir`, so names keep counting across runs."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _LEADING_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def slug(text: str) -> str:
    """A prompt made safe as part of a file name: word characters kept, every other run of characters '-'."""
    return re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_") or "untitled"


def _cut(text: str, max_bytes: int) -> str:
    """`text` shortened to at most `max_bytes` of UTF-8, never splitting a character."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def _shown(text: str, limit: int = 60) -> str:
    """A user's text as quoted in a message: whole when short, cut otherwise, so an error stays one line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_name_template(template: str) -> None:
    """Refuse a --name template that is more than the documented fields with simple format specs.

    No attribute or index access (`{seed.__class__}`), no conversions, no nested fields, widths and
    precisions of at most 255, so a template can neither reach into objects nor build a giant name.
    """
    fields = ", ".join(NAME_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"bad --name template {_shown(template)} ({e}); fields: {fields}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in NAME_FIELDS:
            raise UsageError(f"unknown field {_shown(name)} in --name {_shown(template)}; fields: {fields}")
        match = _FORMAT_SPEC.fullmatch(spec or "")
        too_wide = match is not None and any(int(match.group(g) or 0) > MAX_NAME_BYTES for g in ("width", "precision"))
        if conversion is not None or match is None or too_wide:
            raise UsageError(
                f"--name {_shown(template)}: {{{name}}} takes only a simple format such as {{index:05d}} or "
                f"{{prompt:.40}} (widths up to {MAX_NAME_BYTES}); fields: {fields}"
            )


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


def ensure_writable(folders: Iterable[Path]) -> None:
    """Create each output folder and check a file can be made in it, before any time goes into generating."""
    for folder in dict.fromkeys(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".sdcli-check-"):
                pass
        except OSError as e:
            raise SdcliError(
                f"cannot write into {folder}: {e.strerror or e}; choose another --outdir or --output, "
                "or fix the folder's permissions"
            ) from None


def numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}-{number:04d}{path.suffix}")


class Namer:
    """Target paths: `--output` (numbered when a run makes several images) or `--outdir` with a template.

    Template fields: index (counting on from the highest number already in the folder), seed, prompt
    (a file-name-safe slug), sampler, steps, cfg, width, height, model, date, time.
    """

    def __init__(
        self,
        output: Path | None,
        outdir: Path | None,
        template: str | None,
        model_name: str,
        overwrite: bool = False,
    ) -> None:
        if output is not None and (outdir is not None or template is not None):
            raise UsageError("give either --output or --outdir/--name, not both")
        if output is not None and output.suffix.lower() != ".png":
            raise UsageError(f"--output must name a .png file, got {output}")
        self.output = output
        self.outdir = outdir or DEFAULT_OUTDIR
        self.template = template or DEFAULT_NAME
        self.model_name = model_name
        self.overwrite = overwrite
        self.now = datetime.now()
        self.start = next_index(self.outdir) if output is None else 0
        check_name_template(self.template)
        self._render(0, GenerationRequest("prompt"))  # a bad template fails before anything runs

    @property
    def folder(self) -> Path:
        """Where a prompt file's own output names must stay: --outdir, or the folder of --output."""
        return self.output.parent if self.output is not None else self.outdir

    def _render(self, index: int, request: GenerationRequest) -> str:
        fields = {
            "index": index, "seed": request.seed, "prompt": _cut(slug(request.prompt), MAX_PROMPT_IN_NAME),
            "sampler": resolve_sampler(request.sampler).name, "steps": request.steps, "cfg": request.cfg,
            "width": request.width, "height": request.height, "model": self.model_name,
            "date": self.now.strftime("%Y-%m-%d"), "time": self.now.strftime("%H%M%S"),
        }  # fmt: skip
        try:
            name = self.template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(
                f"bad --name template {_shown(self.template)} ({e}); fields: {', '.join(NAME_FIELDS)}"
            ) from None
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UsageError(f"--name {_shown(self.template)} must give a plain file name, got {_shown(name)}")
        name = name if name.lower().endswith(".png") else name + ".png"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise UsageError(
                f"--name {_shown(self.template)} gives a file name of {len(name.encode())} bytes, more than the "
                f"{MAX_NAME_BYTES} a file system allows: shorten it (e.g. {{prompt:.40}})"
            )
        return name

    def paths(self, requests: list[GenerationRequest], job_output: str | None, total: int, done: int) -> list[Path]:
        """Targets for one job's images; `done` images of the run's `total` came before them.

        Raises UsageError for a job's own output name that leaves the output folder, is not a .png, or
        would replace a file that is not a PNG image.
        """
        if job_output is not None:
            base = self._job_output(job_output)
            targets = [base] if len(requests) == 1 else [numbered(base, i + 1) for i in range(len(requests))]
        elif self.output is not None:
            targets = (
                [self.output] if total == 1 else [numbered(self.output, done + i + 1) for i in range(len(requests))]
            )
        else:
            targets = [self.outdir / self._render(self.start + done + i, r) for i, r in enumerate(requests)]
        if self.overwrite:
            for target in targets:
                if target.exists() and not _is_png(target):
                    raise UsageError(f"{target} exists and is not a PNG image: sdcli does not replace it")
        return targets

    def _job_output(self, job_output: str) -> Path:
        """A prompt file's "output", relative to the output folder, kept inside it."""
        target = self.folder / job_output
        shown = _shown(job_output)
        if target.suffix.lower() != ".png":
            raise UsageError(f'"output" must name a .png file, got {shown}')
        root = self.folder.resolve()
        resolved = target.resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise UsageError(
                f'"output" {shown} is outside {self.folder}: a prompt file names files inside --outdir '
                "(or the folder of --output) only"
            )
        return target


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
        negative=values.get("negative", ""),
        steps=values.get("steps", DEFAULTS.steps),
        cfg=float(values.get("cfg", DEFAULTS.cfg)),
        sampler=values.get("sampler", DEFAULTS.sampler),
        seed=first_seed,
        clip_skip=values.get("clip_skip", DEFAULTS.clip_skip),
        strength=float(strength),
        mask_blur=values.get("mask_blur", 0) if mask else 0,
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


def batches(planned: list[Planned], batch_size: int) -> Iterator[list[tuple[int, Planned]]]:
    """Images that can share a UNet call (same size, steps, sampler, ...), in groups of at most `batch_size`,
    in the order their kind first appears; each image with its place in `planned`."""
    groups: dict[tuple, list[tuple[int, Planned]]] = {}
    for index, item in enumerate(planned):
        groups.setdefault(item.request.batch_key(), []).append((index, item))
    for group in groups.values():
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
) -> Iterator[Written | Failed]:
    """Generate and write every planned image; yields each one written, or each job that failed, in the
    order of `planned` (images are batched by settings, and held back until those before them are out).

    For inpainting, the pixels outside the feathered mask are pasted back from the init image. An image
    whose pixels are not finite fails with NAN_MESSAGE instead of being written black; running out of
    memory fails the batch's jobs with advice. An `Interrupted` raised by `on_step` drops the batch in
    flight (nothing half-written), reports what was written, and propagates; `should_stop` is asked before
    each batch.
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
            finished.update(_make(model, chunk, model_hash, overwrite, on_step, vae_tiling, warn))
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
) -> dict[int, Written | Failed | None]:
    """Generate one batch and write its images; the result of each image, by its place in the plan."""
    started = time.monotonic()
    requests = [item.request for _, item in chunk]
    try:
        images = generate(model, requests, callback=on_step, vae_tiling=vae_tiling, warn=warn)
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
        text = format_infotext(
            request.prompt, request.negative, infotext_parameters(request, model_hash, model.path.stem)
        )
        results[index] = Written(item, save_png(image, item.target, text, overwrite=overwrite), seconds)
    return results
