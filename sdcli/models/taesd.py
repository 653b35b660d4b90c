"""TAESD, the tiny autoencoder (madebyollin/taesd), with the published files' key names.

The original files hold `nn.Sequential` state dicts: `taesd_encoder.safetensors` keys are `0.weight`,
`1.conv.0.weight`, `2.weight`, ...; `taesd_decoder.safetensors` starts at `1.weight` because index 0 is the
parameterless clamp. Our `Encoder` and `Decoder` are the same sequences, so those files load as they are.
diffusers' `AutoencoderTiny` (`diffusion_pytorch_model.safetensors`) stores the same tensors as
`encoder.layers.N...` and `decoder.layers.N...`, its decoder without the clamp: its index N is our N + 1
(the rule of diffusers' `scripts/convert_tiny_autoencoder_to_diffusers.py`).

Latent space: TAESD was distilled to stand in for the KL VAE *with* the family's scale factor. `encode`
returns, and `decode` takes, the latents the samplers work on: the KL VAE's mean times the scale factor
(0.18215 for SD 1.x/2.x with taesd, 0.13025 for SDXL with taesdxl). So TAESD replaces
`vae.encode(x).mean * scale_factor` and `vae.decode(z / scale_factor)` with no scale factor at all (diffusers
gives `AutoencoderTiny` a scaling_factor of 1.0 for this reason). Its `latent_magnitude` 3 and
`latent_shift` 0.5 only map latents into [0, 1] to store them as 8-bit images, which sdcli does not do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sdcli.checkpoint import TensorReader, skipped_initialisers
from sdcli.errors import CheckpointError
from sdcli.header import TensorInfo, read_header
from sdcli.models.configs import TAESD, TaesdConfig

DIFFUSERS_PREFIXES = {"encoder": "encoder.layers.", "decoder": "decoder.layers."}
DIFFUSERS_DECODER_OFFSET = 1  # diffusers' decoder has no clamp at index 0


def conv3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents into (-3, 3), where TAESD's training latents lie."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3).mul_(3)


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus a skip (a 1x1 conv only where the width changes), then ReLU."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        # In place on each conv's fresh output: nothing else holds it.
        self.conv = nn.Sequential(
            conv3(n_in, n_out), nn.ReLU(inplace=True), conv3(n_out, n_out), nn.ReLU(inplace=True), conv3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x).add_(self.skip(x)))


class Encoder(nn.Sequential):
    """Image in [0, 1] (B, 3, H, W) -> latents (B, 4, H/8, W/8); indices as in `taesd_encoder.safetensors`."""

    def __init__(self, cfg: TaesdConfig):
        c = cfg.channels
        layers: list[nn.Module] = []
        for stage, count in enumerate(cfg.encoder_blocks):
            layers.append(conv3(cfg.image_channels, c) if stage == 0 else conv3(c, c, stride=2, bias=False))
            layers += [Block(c, c) for _ in range(count)]
        layers.append(conv3(c, cfg.latent_channels))
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """Latents (B, 4, h, w) -> image in about [0, 1] (B, 3, 8h, 8w); indices as in `taesd_decoder.safetensors`."""

    def __init__(self, cfg: TaesdConfig):
        c = cfg.channels
        layers: list[nn.Module] = [Clamp(), conv3(cfg.latent_channels, c), nn.ReLU(inplace=True)]
        for stage, count in enumerate(cfg.decoder_blocks):
            layers += [Block(c, c) for _ in range(count)]
            if stage < len(cfg.decoder_blocks) - 1:
                layers += [nn.Upsample(scale_factor=2), conv3(c, c, bias=False)]
        layers.append(conv3(c, cfg.image_channels))
        super().__init__(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD's encoder and decoder (either may be absent) in the pipeline's conventions.

    Images are in [-1, 1]; latents are the samplers' (scaled) latents, see the module docstring.
    """

    def __init__(self, encoder: Encoder | None, decoder: Decoder | None, cfg: TaesdConfig = TAESD):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.decoder_blocks) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8), ready for the sampler."""
        if self.encoder is None:
            raise CheckpointError("no TAESD encoder is loaded: give its file too (e.g. taesd_encoder.safetensors)")
        return self.encoder(images.add(1).div(2))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w), as the sampler returns them -> images in about [-1, 1] (B, 3, 8h, 8w)."""
        if self.decoder is None:
            raise CheckpointError("no TAESD decoder is loaded: give its file too (e.g. taesd_decoder.safetensors)")
        return self.decoder(latents).mul_(2).sub_(1)


def diffusers_key(key: str) -> tuple[str, str] | None:
    """diffusers' `AutoencoderTiny` key -> (part, our key), or None for a key outside both parts."""
    for part, prefix in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if part == "decoder" and index.isdigit():
                index = str(int(index) + DIFFUSERS_DECODER_OFFSET)
            return part, f"{index}.{rest}"
    return None


def to_diffusers_key(part: str, key: str) -> str:
    """Our encoder or decoder key -> diffusers' `AutoencoderTiny` key (the inverse of `diffusers_key`)."""
    index, _, rest = key.partition(".")
    if part == "decoder":
        index = str(int(index) - DIFFUSERS_DECODER_OFFSET)
    return f"{DIFFUSERS_PREFIXES[part]}{index}.{rest}"


def file_parts(infos: dict[str, TensorInfo]) -> dict[str, dict[str, str]]:
    """The parts a TAESD file holds: {"encoder" | "decoder": {our key: the file's key}}.

    diffusers' combined file is recognised by its prefixes and must hold both parts. Otherwise the file is
    an original one: an encoder starts with the input conv `0.weight`; a decoder has no index 0 (the clamp).
    Keys that belong to neither part are kept under "" so the strict check names them.
    """
    if any(diffusers_key(k) for k in infos):
        parts: dict[str, dict[str, str]] = {"encoder": {}, "decoder": {}, "": {}}
        for key in infos:
            part, ours = diffusers_key(key) or ("", key)
            parts[part][ours] = key
        return parts
    part = "encoder" if "0.weight" in infos else "decoder"
    return {part: {key: key for key in infos}}


def _mismatch(path: Path, part: str, kind: str, keys: list[str]) -> CheckpointError:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return CheckpointError(
        f"{path}: not a TAESD {part} file ({kind} {shown}); give taesd(xl)_encoder/_decoder.safetensors "
        "or diffusers' AutoencoderTiny diffusion_pytorch_model.safetensors"
    )


def load_part(
    path: Path,
    reader: TensorReader,
    infos: dict[str, TensorInfo],
    keys: dict[str, str],
    part: str,
    cfg: TaesdConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> nn.Module:
    """Build the encoder or decoder on the meta device and fill it strictly from `keys` (ours -> the file's)."""
    with torch.device("meta"), skipped_initialisers():
        module = Encoder(cfg) if part == "encoder" else Decoder(cfg)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if missing := sorted(expected.keys() - keys.keys()):
        combined = any(diffusers_key(name) for name in infos)
        raise _mismatch(path, part, "missing", [to_diffusers_key(part, k) if combined else k for k in missing])
    if unexpected := sorted(keys.keys() - expected.keys()):
        raise _mismatch(path, part, "unexpected", [keys[k] for k in unexpected])
    found = {k: infos[keys[k]].shape for k in expected}
    if wrong := [f"{keys[k]} {found[k]} (expected {v})" for k, v in expected.items() if found[k] != v]:
        raise _mismatch(path, part, "wrong shape for", wrong)
    state = {k: reader.read(infos[keys[k]], dtype, device, memory_format) for k in expected}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_taesd(
    paths: Sequence[str | os.PathLike],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cfg: TaesdConfig = TAESD,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> TinyAutoencoder:
    """TAESD from .safetensors files: diffusers' combined file, or the original encoder and/or decoder files.

    A decoder alone is enough to decode (e.g. for previews). Every file is checked strictly (missing,
    unexpected and misshapen keys) and an error is one line (`CheckpointError`).
    """
    if not paths:
        raise CheckpointError("no TAESD file given: give taesd_decoder.safetensors (and taesd_encoder.safetensors)")
    modules: dict[str, nn.Module] = {}
    for path in map(Path, paths):
        infos = read_header(path)
        parts = file_parts(infos)
        if stray := sorted(parts.pop("", {})):
            raise _mismatch(path, "encoder and decoder", "unexpected", stray)
        with TensorReader(path) as reader:
            for part, keys in parts.items():
                if part in modules:
                    raise CheckpointError(f"{path}: a second TAESD {part}; give one encoder and one decoder")
                modules[part] = load_part(path, reader, infos, keys, part, cfg, dtype, device, memory_format)
    return TinyAutoencoder(modules.get("encoder"), modules.get("decoder"), cfg)
