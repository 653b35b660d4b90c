"""Jobs: requests in batches, output names, and the PNGs written (atomically, never clobbering) per image."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from sdcli import __version__
from sdcli.checkpoint import StableDiffusion
from sdcli.errors import UsageError
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
from sdcli.pipeline import GenerationRequest, generate
from sdcli.sampler_names import resolve_sampler
from sdcli.weights import short_hash

DEFAULT_OUTDIR = Path("outputs")
_LEADING_NUMBER = re.compile(r"^(\d+)-")


def next_index(outdir: Path) -> int:
    """The number after the highest `NNNNN-` prefix in `outdir`, so names keep counting across runs."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _LEADING_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def output_paths(output: Path | None, outdir: Path | None, seeds: list[int]) -> list[Path]:
    """One target path per image.

    `--output name.png` names a single image, or numbers several as name-0001.png, name-0002.png, ...;
    otherwise images go to `--outdir` (default ./outputs) as `00000-SEED.png`, counting on from the
    highest number already there.
    """
    if output is not None and outdir is not None:
        raise UsageError("give either --output or --outdir, not both")
    if output is not None:
        if output.suffix.lower() != ".png":
            raise UsageError(f"--output must name a .png file, got {output}")
        if len(seeds) == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i:04d}.png") for i in range(1, len(seeds) + 1)]
    outdir = outdir or DEFAULT_OUTDIR
    start = next_index(outdir)
    return [outdir / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


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


def generate_to_files(
    model: StableDiffusion,
    requests: list[GenerationRequest],
    targets: list[Path],
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> Iterator[Path]:
    """Generate the requests in batches of `batch_size` and write each image; yields the paths written.

    For inpainting, the pixels outside the feathered mask are pasted back from the init image.
    """
    model_hash = short_hash(model.path)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        images = to_pil(generate(model, chunk, callback=on_step))
        for request, image, target in zip(chunk, images, targets[start : start + batch_size], strict=True):
            if request.mask is not None:
                image = paste_unmasked(image, request.init, request.mask)
            params = infotext_parameters(request, model_hash, model.path.stem)
            text = format_infotext(request.prompt, request.negative, params)
            yield save_png(image, target, text, overwrite=overwrite)
