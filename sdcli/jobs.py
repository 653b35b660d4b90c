"""Jobs: what the command line, one line of a prompt file, or a PNG's parameters ask for.

A job is a prompt plus the settings it overrides; the run's options fill in the rest. Reading a prompt
file never stops at a bad line: each line becomes a job or a `LineError` that names its line, so the
caller can report it and go on (or stop, with --fail-fast).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from sdcli.errors import ImageError, UsageError
from sdcli.images import read_png_parameters
from sdcli.infotext import AUTOMATIC, parse_infotext, schedule_from_label
from sdcli.request import parse_pair

# The fields a JSON Lines job may set, with the types JSON gives them.
JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative": (str,),
    "seed": (int,),
    "steps": (int,),
    "cfg": (int, float),
    "width": (int,),
    "height": (int,),
    "sampler": (str,),
    "schedule": (str,),
    "n": (int,),
    "output": (str,),
    "lora": (str, list),  # FILE[:WEIGHT], or a list of them, as --lora
    "original_size": (str,),  # SDXL: "WxH", as --original-size
    "crop": (str,),  # SDXL: "X,Y", as --crop
    "aesthetic_score": (int, float),  # SDXL refiner, as --aesthetic-score
    "negative_aesthetic_score": (int, float),  # SDXL refiner, as --negative-aesthetic-score
    "rng": (str,),  # "cpu" or "cuda", as --rng
}
IMAGE_JOB_FIELDS: dict[str, tuple[type, ...]] = {"init": (str,), "mask": (str,), "strength": (int, float)}


@dataclass(frozen=True, eq=False)
class Job:
    """The settings one job sets; `line` is its 1-based line in the prompt file (None elsewhere)."""

    values: dict[str, object] = field(default_factory=dict)
    line: int | None = None

    def where(self, source: str) -> str:
        return f"{source} line {self.line}" if self.line is not None else source


@dataclass(frozen=True)
class LineError:
    line: int
    message: str


def parse_prompt_file(
    text: str, *, jsonl: bool | None = None, image_fields: bool = False
) -> tuple[list[Job], list[LineError]]:
    """Jobs from a prompt file, and the lines that could not be read.

    Plain text: one prompt per line, or a line of AUTOMATIC1111-style options (`--prompt "a cat" --steps
    30`, see A1111_OPTIONS). JSON Lines (when `jsonl`, or detected from a first line that starts
    with "{"): one object per line with "prompt" and any of JOB_FIELDS (and init, mask, strength when
    `image_fields`). Blank lines and lines starting with "#" are skipped in both; a UTF-8 byte order mark
    (which some Windows editors write) is ignored. A seed of -1 means a random one, as in A1111.
    """
    text = text.removeprefix("\ufeff")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if jsonl is None:
        jsonl = bool(lines) and lines[0][1].startswith("{")
    allowed = {**JOB_FIELDS, **(IMAGE_JOB_FIELDS if image_fields else {})}
    jobs, errors = [], []
    for number, line in lines:
        try:
            if jsonl:
                values = _json_job(line, allowed)
            elif line.startswith("--"):
                values = _options_job(line, allowed)
            else:
                values = {"prompt": _plain_prompt(line)}
            jobs.append(Job(values, number))
        except UsageError as e:
            errors.append(LineError(number, str(e)))
    return jobs, errors


# AUTOMATIC1111's "Prompts from file" lines: `--prompt "a cat" --steps 30 --cfg_scale 7`.
A1111_OPTIONS = {
    "prompt": "prompt", "negative_prompt": "negative", "seed": "seed", "steps": "steps", "cfg_scale": "cfg",
    "width": "width", "height": "height", "sampler_name": "sampler", "n_iter": "n", "lora": "lora", "rng": "rng",
}  # fmt: skip


# " --word" inside a plain line: an option typed after the prompt. Dashes not followed by a letter
# ("a cat -- sketch", "---") stay part of the prompt.
_OPTION_IN_PROMPT = re.compile(r"(?:^|\s)(--[A-Za-z][\w-]*)(?=\s|=|$)")


def _plain_prompt(line: str) -> str:
    """A plain line is the prompt, unless it carries options after the prompt, which would otherwise be drawn."""
    if match := _OPTION_IN_PROMPT.search(line):
        option = match.group(1)
        if option.removeprefix("--") in A1111_OPTIONS:
            raise UsageError(
                f"{option} after a plain prompt: write the line as A1111 does, "
                f'--prompt "..." {option} VALUE, or use JSON Lines'
            )
        raise UsageError(
            f"unknown option {option!r} in the prompt; known: {', '.join('--' + k for k in A1111_OPTIONS)} "
            '(to draw it as text, write the line as --prompt "...")'
        )
    return line


def _options_job(line: str, allowed: dict[str, tuple[type, ...]]) -> dict[str, object]:
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UsageError(f"cannot split the line into options ({e})") from None
    values: dict[str, object] = {}
    while words:
        option = words.pop(0)
        key = A1111_OPTIONS.get(option.removeprefix("--")) if option.startswith("--") else None
        if key is None:
            raise UsageError(f"unknown option {option!r}; known: {', '.join('--' + k for k in A1111_OPTIONS)}")
        if not words:
            raise UsageError(f"{option} needs a value")
        text = words.pop(0)
        if key == "lora":  # repeatable, as on the command line
            values.setdefault("lora", []).append(text)
            continue
        try:
            values[key] = text if str in allowed[key] else (float(text) if float in allowed[key] else int(text))
        except ValueError:
            raise UsageError(f"{option} must be a number, got {text!r}") from None
    if "prompt" not in values:
        raise UsageError("no --prompt on the line")
    return values


def _json_job(line: str, allowed: dict[str, tuple[type, ...]]) -> dict[str, object]:
    try:
        values = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(values, dict):
        raise UsageError('a JSON Lines job is an object such as {"prompt": "a cat", "seed": 1}')
    if unknown := sorted(values.keys() - allowed.keys()):
        raise UsageError(f"unknown field {', '.join(map(repr, unknown))}; known fields: {', '.join(allowed)}")
    if "prompt" not in values:
        raise UsageError('no "prompt" field')
    for key, value in values.items():
        # bool is an int in Python, never a number in a job
        if key == "lora" and isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise UsageError(f'field "lora" must be a string or a list of strings, got {json.dumps(value)}')
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            kind = " or ".join(t.__name__ for t in allowed[key])
            raise UsageError(f"field {key!r} must be {kind}, got {json.dumps(value)}")
    return values


# A1111's noise sources (its `RNG` infotext value) as --rng: its "GPU" is torch's CUDA generator on NVIDIA
# GPUs, whose noise "NV" reproduces anywhere.
A1111_RNG = {"CPU": "cpu", "GPU": "cuda", "NV": "cuda"}


@dataclass(frozen=True)
class PngJob:
    """A job recreated from a PNG's parameters, with the model it was made with."""

    job: Job
    model_name: str | None
    model_hash: str | None
    lora_hashes: str | None = None  # A1111's "Lora hashes" value
    vae_name: str | None = None


def job_from_png(path: str) -> PngJob:
    """The job that made an image, from its `parameters` chunk (sdcli's or AUTOMATIC1111's)."""
    text = read_png_parameters(path)
    if not text:
        raise ImageError(f"{path} has no generation parameters (no 'parameters' text chunk) to reproduce")
    prompt, negative, params = parse_infotext(text)
    values: dict[str, object] = {"prompt": prompt, "negative": negative or None}  # none written: none given
    try:
        if "Steps" in params:
            values["steps"] = int(params["Steps"])
        if "CFG scale" in params:
            values["cfg"] = float(params["CFG scale"])
        if "Seed" in params:
            values["seed"] = int(params["Seed"])
        if "Size" in params:
            width, height = params["Size"].lower().split("x")
            values["width"], values["height"] = int(width), int(height)
        if "Clip skip" in params:
            values["clip_skip"] = int(params["Clip skip"])
        if "Denoising strength" in params:
            values["strength"] = float(params["Denoising strength"])
        if "Mask blur" in params:
            values["mask_blur"] = int(params["Mask blur"])
        # SDXL's size conditioning, as `infotext_parameters` writes it.
        if "Original size" in params:
            values["original_size"] = "x".join(map(str, parse_pair(params["Original size"], "x", "Original size")))
        if "Crop" in params:
            values["crop"] = ",".join(map(str, parse_pair(params["Crop"], ",", "Crop")))
        # The SDXL refiner's scores, as `infotext_parameters` writes them.
        if "Aesthetic score" in params:
            values["aesthetic_score"] = float(params["Aesthetic score"])
        if "Negative aesthetic score" in params:
            values["negative_aesthetic_score"] = float(params["Negative aesthetic score"])
    except (ValueError, UsageError) as e:
        raise ImageError(f"{path}: unreadable generation parameters ({e})") from None
    # A1111 reads a missing RNG as its default, GPU; sdcli images made before it wrote RNG used the CPU.
    rng = params.get("RNG", "CPU" if params.get("Version", "").startswith("sdcli") else "GPU")
    values["rng"] = A1111_RNG.get(rng.upper(), rng)  # another value is refused unless --rng replaces it
    if "Sampler" in params:
        values["sampler"] = params["Sampler"]
    # A1111 1.9+ (and sdcli) write the schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras". Older
    # images name it in the sampler ("DPM++ 2M Karras"), which the sampler's name resolves.
    if (schedule := schedule_from_label(params.get("Schedule type", AUTOMATIC))) is not None:
        values["schedule"] = schedule
    return PngJob(
        Job(values), plain_model_name(params.get("Model")), params.get("Model hash"), params.get("Lora hashes"),
        params.get("VAE"),
    )  # fmt: skip


def plain_model_name(name: str | None) -> str | None:
    """The file name a PNG's `Model` names, without any folders: a model named by an image is looked up in the
    weights folder only, never opened from a path the image chose. None when nothing usable is left."""
    if name is None:
        return None
    plain = re.split(r"[\\/]", name.strip())[-1]
    return None if plain in ("", ".", "..") or plain.startswith("~") else plain
