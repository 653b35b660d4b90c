"""Jobs: requests in batches, output names, and the PNGs written (atomically, never clobbering) per image."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from sdcli import __version__
from sdcli.checkpoint import StableDiffusion
from sdcli.download import short_hash
from sdcli.errors import UsageError
from sdcli.images import format_infotext, save_png, to_pil
from sdcli.pipeline import GenerationRequest, txt2img
from sdcli.samplers import resolve_sampler

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
    """Generate the requests in batches of `batch_size` and write each image; yields the paths written."""
    model_hash = short_hash(model.path)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        images = txt2img(model, chunk, callback=on_step)
        for request, image, target in zip(chunk, to_pil(images), targets[start : start + batch_size], strict=True):
            text = format_infotext(
                request.prompt, request.negative, infotext_parameters(request, model_hash, model.path.stem)
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            yield save_png(image, target, text, overwrite=overwrite)
