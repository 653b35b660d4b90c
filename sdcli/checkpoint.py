"""Single-file checkpoints: read the safetensors header, detect the family, load each network directly.

Our modules carry the checkpoint's attribute names, so loading a component is: take the keys under its
prefix, strip the prefix, cast each tensor into the target dtype and device, and assign it into a module
built on the meta device. The file is memory-mapped and read one tensor at a time, so no second full
copy of the weights is ever held.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from sdcli.errors import CheckpointError
from sdcli.families import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, Family, detect
from sdcli.header import TensorInfo, read_header
from sdcli.models.clip import ClipTextModel
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL

# Keys a component's prefix may hold that are not weights of ours: buffers older libraries saved.
IGNORED_SUFFIXES = ("position_ids",)


def _mismatch_error(path: Path, component: str, kind: str, keys: list[str]) -> CheckpointError:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return CheckpointError(f"{path}: {component}: {kind} {shown}; the file is damaged or not an SD 1.x checkpoint")


def load_component(
    path: Path,
    handle,
    infos: dict[str, TensorInfo],
    prefix: str,
    build: Callable[[], nn.Module],
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """Build a module on the meta device and fill it from the keys under `prefix`, cast one by one."""
    with torch.device("meta"):
        module = build()
    component = type(module).__name__
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {
        k[len(prefix) :]: info.shape
        for k, info in infos.items()
        if k.startswith(prefix) and info.shape and not k.endswith(IGNORED_SUFFIXES)
    }
    if missing := sorted(expected.keys() - found.keys()):
        raise _mismatch_error(path, component, "missing", [prefix + k for k in missing])
    if unexpected := sorted(found.keys() - expected.keys()):
        raise _mismatch_error(path, component, "unexpected", [prefix + k for k in unexpected])
    if wrong := [f"{prefix}{k} {found[k]} (expected {v})" for k, v in expected.items() if found[k] != v]:
        raise _mismatch_error(path, component, "wrong shape for", wrong)
    state = {k: handle.get_tensor(prefix + k).to(device=device, dtype=dtype) for k in expected}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


@dataclass
class StableDiffusion:
    """A loaded checkpoint: its family, the three networks and the tokenizer that feeds them."""

    family: Family
    text_encoder: ClipTextModel
    unet: UNetModel
    vae: AutoencoderKL
    path: Path

    @cached_property
    def tokenizer(self):
        from sdcli.tokenizer import ClipTokenizer

        return ClipTokenizer(max_length=self.family.clip.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion:
    """Load a single-file SD checkpoint (.safetensors, original layout) onto `device` in `dtype`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    infos = read_header(path)
    family = detect({k: v.shape for k, v in infos.items()})
    try:
        handle_cm = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot open as safetensors ({e}); re-download the file") from None
    with handle_cm as handle:

        def load(prefix: str, build: Callable[[], nn.Module]) -> nn.Module:
            return load_component(path, handle, infos, prefix, build, dtype, device)

        text_encoder = load(CLIP_PREFIX, lambda: ClipTextModel(family.clip))
        unet = load(UNET_PREFIX, lambda: UNetModel(family.unet))
        vae = load(VAE_PREFIX, lambda: AutoencoderKL(family.vae))
    return StableDiffusion(family, text_encoder, unet, vae, path)
