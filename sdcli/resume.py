"""--skip-existing: finishing a run that stopped (a crash, Ctrl-C, a preempted node) by re-running the same
command. An image is skipped when its output file exists and carries exactly the PNG parameters it would be
written with (prompt, negative prompt, seed, steps, sampler, size, model hash, ...), so a file from another
run or other settings under the same name is never mistaken for it."""

from __future__ import annotations

from pathlib import Path

from sdcli.errors import ImageError
from sdcli.images import read_png_parameters


def already_written(target: Path, parameters: str) -> bool:
    """True when `target` is an image whose PNG parameters are exactly `parameters`."""
    if not target.is_file():
        return False
    try:
        return read_png_parameters(target) == parameters
    except ImageError:
        return False
