"""What one image asks for: `GenerationRequest`, the defaults every entry point shares, and the limits.

The command line, prompt files, `--from-png` and the Python API all build requests from `DEFAULTS` and
check them with `GenerationRequest.validate`, so a number is accepted or refused the same way wherever
it comes from. The size default belongs to the model family (`Family.default_size`), known once the
checkpoint's header has been read; a distilled model's recommended settings (`model_specs.model_defaults`)
come between the user's options and DEFAULTS (`model_settings`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdcli.errors import UsageError

if TYPE_CHECKING:  # kept out of the import, so the command line reads DEFAULTS without loading torch
    from PIL import Image

    from sdcli.extra_networks import LoraRef
    from sdcli.families import Family
    from sdcli.sampler_names import SamplerSpec

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # as AUTOMATIC1111 and stable-diffusion.cpp: -1 asks for a random seed
MIN_SIDE = 64
# 4096x4096: beyond this a single image needs tens of GB for the UNet's attention and the VAE alone.
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000
MAX_CFG = 100.0  # real use stays below 30; larger values only burn the image out
MAX_MASK_BLUR = 256
MAX_AESTHETIC_SCORE = 10.0  # the LAION aesthetic predictor's scale, which the SDXL refiner was trained on
RNG_SOURCES = ("cpu", "cuda")  # whose noise an image draws: torch's CPU generator, or its CUDA one


@dataclass(frozen=True)
class Defaults:
    """The value of every setting nobody gave. The size is the model family's (`Family.default_size`)."""

    sampler: str = "DPM++ 2M Karras"
    steps: int = 20
    cfg: float = 7.5
    clip_skip: int = 1
    rng: str = "cpu"
    n: int = 1
    batch_size: int = 1
    max_images: int = 10_000  # per job and per run; `--max-images` raises it
    img2img_strength: float = 0.75
    inpaint_strength: float = 1.0
    mask_blur: int = 4
    resize: str = "crop"
    invert_mask: bool = False
    preview_every: int = 5  # steps between two --preview images
    aesthetic_score: float = 6.0  # the SDXL refiner's, for the prompt
    negative_aesthetic_score: float = 2.5  # ... and for the negative prompt
    size: int = 512  # SD 1.x; only where no model family is known (the Python API's dataclass default)

    def strength(self, command: str) -> float:
        """The default denoising strength of a command: img2img changes part of the image, inpaint all of
        the masked area."""
        return self.img2img_strength if command == "img2img" else self.inpaint_strength


DEFAULTS = Defaults()


def parse_pair(text: str, separator: str, what: str) -> tuple[int, int]:
    """ "1024x768" (separator "x") or "0,32" (separator ",") -> (1024, 768), (0, 32); else a UsageError that
    says what `what` should look like."""
    parts = text.lower().replace(" ", "").split(separator)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        example = f"1024{separator}1024" if separator == "x" else f"0{separator}0"
        raise UsageError(f"{what} must be two whole numbers like {example}, got {text!r}")
    return int(parts[0]), int(parts[1])


def random_seed() -> int:
    """A fresh random seed, small enough that seed + i stays valid for any number of images."""
    return secrets.randbelow(2**31)


def is_random_seed(seed: int | None) -> bool:
    """True when `seed` asks for a random one: not given, or -1."""
    return seed is None or seed == RANDOM_SEED


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. Requests that share size, steps, cfg, sampler and mode can run as one batch.

    `init` (img2img, inpaint) is an RGB image already at width x height; `mask` (inpaint) an "L" image of
    the same size, feathered, where 255 means repaint. `strength` is the fraction of the schedule run.
    """

    prompt: str
    # None: no negative prompt given. Most families encode "" then; SDXL (as Stability's code and diffusers)
    # gives the unconditional branch zero embeddings instead (`Family.zero_missing_negative`).
    negative: str | None = None
    width: int = DEFAULTS.size
    height: int = DEFAULTS.size
    steps: int = DEFAULTS.steps
    cfg: float = DEFAULTS.cfg
    sampler: str = DEFAULTS.sampler
    seed: int = 0
    clip_skip: int = DEFAULTS.clip_skip
    init: Image.Image | None = field(default=None, compare=False)
    mask: Image.Image | None = field(default=None, compare=False)
    strength: float = 1.0
    mask_blur: int = 0  # how the mask was feathered; recorded in the PNG's parameters
    loras: tuple[LoraRef, ...] = ()  # merged into the weights while this request runs (`sdcli.lora_sets`)
    rng: str = DEFAULTS.rng
    # SDXL's size conditioning: the original image size (width, height; None: this image's size) and the
    # crop's top-left corner (x, y), as `--original-size WxH` and `--crop X,Y`.
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)

    def size_conditioning(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's six numbers: original height and width, crop top and left, target height and width."""
        width, height = self.original_size or (self.width, self.height)
        return (height, width, self.crop[1], self.crop[0], self.height, self.width)

    def refiner_conditioning(self, negative: bool = False) -> tuple[float, float, float, float, float]:
        """The SDXL refiner's five numbers: original height and width, crop top and left, and the aesthetic
        score (the negative one for the unconditional branch, which gets the same sizes, as in sgm)."""
        height, width, top, left, _, _ = self.size_conditioning()
        return (height, width, top, left, self.negative_aesthetic_score if negative else self.aesthetic_score)

    # Fields added later come last, so positional construction keeps working.
    schedule: str | None = None  # a name in schedules.SCHEDULES; None: the sampler's own grid
    # The SDXL refiner's aesthetic scores (0 to 10) for the prompt and the negative prompt, as
    # `--aesthetic-score` and `--negative-aesthetic-score`; defaults as Stability's code, diffusers and A1111.
    aesthetic_score: float = DEFAULTS.aesthetic_score
    negative_aesthetic_score: float = DEFAULTS.negative_aesthetic_score

    def validate(self, family: Family | None = None) -> SamplerSpec:
        """Check the numbers a user typed (and, given the model's `family`, that it can honour them); return
        the resolved sampler. Raises UsageError."""
        for name, value in (("width", self.width), ("height", self.height)):
            if value < MIN_SIDE or value % 8:
                raise UsageError(f"{name} must be a multiple of 8 and at least {MIN_SIDE}, got {value}")
        if self.width * self.height > MAX_PIXELS:
            raise UsageError(
                f"{self.width}x{self.height} is {self.width * self.height / 1e6:.1f} megapixels, more than the "
                f"{MAX_PIXELS / 1e6:.1f} (4096x4096) sdcli makes: choose a smaller size (large images also need "
                "--vae-tiling, and --low-memory on a small GPU)"
            )
        if not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {self.seed}")
        if not (math.isfinite(self.cfg) and 0.0 <= self.cfg <= MAX_CFG):
            raise UsageError(f"cfg must be a number between 0 and {MAX_CFG:g}, got {self.cfg}")
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise UsageError(f"strength must be between 0 and 1, got {self.strength}")
        if self.rng not in RNG_SOURCES:
            raise UsageError(f"rng must be one of {', '.join(RNG_SOURCES)}, got {self.rng!r}")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise UsageError(f"mask blur must be between 0 and {MAX_MASK_BLUR} pixels, got {self.mask_blur}")
        if self.original_size is not None and not all(1 <= v <= 65536 for v in self.original_size):
            raise UsageError(f"original size must be WxH with sides from 1 to 65536, got {self.original_size}")
        if not all(0 <= v <= 65536 for v in self.crop):
            raise UsageError(f"crop must be X,Y with 0 <= X, Y <= 65536, got {self.crop}")
        scores = {"aesthetic score": self.aesthetic_score, "negative aesthetic score": self.negative_aesthetic_score}
        for name, score in scores.items():
            if not (math.isfinite(score) and 0.0 <= score <= MAX_AESTHETIC_SCORE):
                raise UsageError(f"{name} must be a number between 0 and {MAX_AESTHETIC_SCORE:g}, got {score}")
        most_skip = family.max_clip_skip if family is not None else None
        if self.clip_skip < 1 or (most_skip is not None and self.clip_skip > most_skip):
            most = f" and at most {most_skip} (the text encoder's layer count)" if most_skip is not None else ""
            raise UsageError(f"clip skip must be 1 or more{most}, got {self.clip_skip}")
        for name, image in (("init image", self.init), ("mask", self.mask)):
            if image is not None and image.size != (self.width, self.height):
                raise ValueError(f"{name} is {image.size}, expected {(self.width, self.height)}")
        from sdcli.sampler_names import resolve_sampler_and_schedule

        return resolve_sampler_and_schedule(self.sampler, self.schedule)

    def batch_key(self) -> tuple:
        return (
            self.width, self.height, self.steps, self.cfg, self.sampler.lower(), (self.schedule or "").lower(),
            self.clip_skip, self.init is None, self.mask is None, self.strength, self.loras,
        )  # fmt: skip


def model_settings(model: dict[str, object], given: set[str]) -> dict[str, object]:
    """The model's recommended settings (`model_specs.model_defaults`) that apply: those of the options the user
    did not give. A schedule comes only with the model's own sampler: a user who picks another sampler gets
    that sampler's grid, not one meant for the model's."""
    chosen = {key: value for key, value in model.items() if key not in given}
    if "sampler" in given and "schedule" not in given:
        chosen.pop("schedule", None)
    return chosen
