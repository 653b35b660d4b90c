"""A generating command's jobs: the PROMPT argument, every line of --prompt-file, or the job a --from-png recorded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sdcli.errors import UsageError

if TYPE_CHECKING:
    from sdcli.jobs import Job, PngJob

# Options that are per-job settings: a prompt-file line or a PNG's parameters can set them too.
SETTINGS = (
    "prompt", "negative", "width", "height", "steps", "cfg", "sampler", "schedule", "n", "clip_skip",
    "init", "mask", "strength", "mask_blur", "invert_mask", "resize", "rng", "original_size", "crop",
    "aesthetic_score", "negative_aesthetic_score",
)  # fmt: skip


class JobSource:
    """Where the jobs came from, for messages, and the prompt-file lines that could not be read."""

    def __init__(self, name: str, errors: list | None = None) -> None:
        self.name, self.errors = name, errors or []


def read_jobs(command: str, opts: dict) -> tuple[list[Job], JobSource, PngJob | None]:
    """The run's jobs, where they came from, and the PNG a --from-png job was read from (None otherwise)."""
    from sdcli.jobs import Job, job_from_png, parse_prompt_file

    prompt, prompt_file, from_png = opts["prompt"], opts["prompt_file"], opts.get("from_png")
    if prompt_file is not None:
        if prompt is not None or from_png is not None:
            raise UsageError("give either a PROMPT, --prompt-file or --from-png")
        name = "stdin" if prompt_file == "-" else prompt_file
        text = sys.stdin.read() if prompt_file == "-" else _read_text(Path(prompt_file))
        jobs, errors = parse_prompt_file(
            text, jsonl=True if name.endswith(".jsonl") else None, image_fields=command != "txt2img"
        )
        if not jobs and not errors:
            raise UsageError(f"{name} holds no prompts (blank lines and # comments are skipped)")
        return jobs, JobSource(name, errors), None
    if from_png is not None:
        png = job_from_png(from_png)
        # The PNG's settings replace the options' defaults; options given on the command line replace both.
        given = {k: opts[k] for k in SETTINGS if k in opts["given"]}
        values = {**png.job.values, **given}
        if opts["seed"] is not None:
            values["seed"] = opts["seed"]
        return [Job(values)], JobSource(str(from_png)), png
    if prompt is None:
        raise UsageError("give a PROMPT (or --prompt-file FILE)")
    return [Job({})], JobSource("command line"), None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {path}: {e}") from None
