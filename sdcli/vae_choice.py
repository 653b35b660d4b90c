"""`--vae taesd|taesdxl|FILE`: whether the choice is TAESD, the tiny autoencoder, and where its files are.

The names `taesd` (SD 1.x/2.x latents) and `taesdxl` (SDXL latents) are looked up in the weights folder as the
file `sdcli download taesd` writes (`taesd.safetensors`, diffusers' combined layout) or as the published pair
`taesd_decoder.safetensors` + `taesd_encoder.safetensors`. A path is TAESD when its keys are TAESD's (either
layout); any other file is a full VAE.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sdcli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

    from sdcli.families import Family
    from sdcli.models.taesd import TinyAutoencoder

TAESD_NAMES = ("taesd", "taesdxl")
_ORIGINAL_KEY = re.compile(r"\d+\.")  # nn.Sequential indices: 0.weight, 1.conv.0.weight, ...
_DIFFUSERS_PREFIXES = ("encoder.layers.", "decoder.layers.")


def is_taesd(value: str | Path) -> bool:
    """True when `--vae value` asks for TAESD: one of TAESD_NAMES, or a .safetensors file with TAESD's keys."""
    if str(value).lower() in TAESD_NAMES:
        return True
    path = Path(value).expanduser()
    if not path.is_file():
        return False
    from sdcli.header import read_header

    keys = list(read_header(path))
    return bool(keys) and (
        all(_ORIGINAL_KEY.match(k) for k in keys) or all(k.startswith(_DIFFUSERS_PREFIXES) for k in keys)
    )


def taesd_name(family: Family) -> str:
    """The TAESD that matches a model family's latents: taesdxl for SDXL, taesd otherwise."""
    return "taesdxl" if family.name.startswith("sdxl") else "taesd"


def taesd_files(value: str | Path, weights_dir: Path) -> list[Path]:
    """The TAESD file(s) `--vae value` names: the file itself, or the named TAESD's files in `weights_dir`.
    Raises UsageError when a name has no files there."""
    name = str(value).lower()
    if name not in TAESD_NAMES:
        return [Path(value).expanduser()]
    found = find_taesd(name, weights_dir)
    if not found:
        raise UsageError(
            f"--vae {name}: no {name}.safetensors (or {name}_decoder.safetensors) in {weights_dir}; "
            f"run `sdcli download {name}`, or give the path of a TAESD file"
        )
    return found


def find_taesd(name: str, weights_dir: Path) -> list[Path]:
    """The files of TAESD `name` in `weights_dir`: the combined file, else the decoder and (if there) the
    encoder; [] when there are none."""
    combined = weights_dir / f"{name}.safetensors"
    if combined.is_file():
        return [combined]
    parts = [weights_dir / f"{name}_{part}.safetensors" for part in ("decoder", "encoder")]
    return [p for p in parts if p.is_file()] if parts[0].is_file() else []


def load_taesd_choice(
    value: str | Path, weights_dir: Path, device: torch.device, dtype: torch.dtype
) -> TinyAutoencoder:
    """TAESD as `--vae value` names it, on `device` in `dtype`. Raises UsageError or CheckpointError."""
    import torch

    from sdcli.models.taesd import load_taesd

    files = taesd_files(value, weights_dir)
    # channels_last on the CPU, as the full VAE: oneDNN's convolutions run it ~30% faster (bench/RESULTS.md).
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    try:
        return load_taesd(files, dtype=dtype, device=device, memory_format=memory_format)
    except OSError as e:
        raise CheckpointError(f"cannot read {files[0]}: {e.strerror or e}") from None
