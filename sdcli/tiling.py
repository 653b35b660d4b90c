"""VAE decode and encode in overlapping tiles, and the decode/encode policy the pipeline uses.

A 2048x2048 image is a 256x256 latent; decoding it whole needs the decoder's 128-channel feature maps
at full resolution (several GB) and a 65536x65536 attention in its middle block. In tiles of 64x64
latents the peak is that of one 512x512 decode. Neighbouring tiles overlap, and the overlap is blended
with linear ramps (each output pixel is a weighted mean of the tiles covering it, weights summing to 1),
so no seams show.

Tiles cannot reproduce the whole decode exactly: the VAE's group norms and its middle-block attention
see only their tile. The ramps hide the edges; the remaining difference is small but not zero.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sdcli.models.vae import AutoencoderKL

# Where free memory is unknown, above this many latent pixels (96x96 = 768x768 pixels for SD) `auto` tiles.
AUTO_TILE_LATENT_AREA = 96 * 96
# An untiled pass peaks at about this many feature maps at full resolution, each as wide as the level that
# upsamples to it (SD: 3 x 256 channels; measured 0.81 GB above the weights for a 512x512 fp32 decode).
FULL_RESOLUTION_MAPS = 3
# `auto` tiles when an untiled pass would need more than this share of the free memory.
FREE_MEMORY_SHARE = 0.5
MEMINFO = Path("/proc/meminfo")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# How allocation failures read on the CPU and MPS, where they are plain RuntimeErrors.
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def tile_layout(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Start offsets and the common length of tiles covering `size` units, overlapping by >= `overlap`.

    As few tiles of `tile` units as can cover the size (the work is their count times their area), spread
    evenly so that every overlap is as wide as the count allows: a 1024-pixel SD side takes 3 tiles of 64
    latents overlapping by 32, rather than overlaps of 16 and 48 with the last tile aligned to the end.
    Shorter tiles would save work but cost fidelity: on the random-weight full-size SD VAE at 1024x1024,
    3x3 tiles of 64 differ from the untiled decode by 3.3% (mean, relative), 3x3 tiles of 54 (1.6x the
    untiled work instead of 2.25x) by 4.7%.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and less than the tile size, got {overlap} and {tile}")
    if size <= tile:
        return [0], size
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)], tile


def ramp_weights(starts: Sequence[int], length: int, scale: int) -> list[torch.Tensor]:
    """Per-tile 1-D blending weights in output units (`scale` output pixels per unit).

    A tile's weight rises linearly across the part it shares with the previous tile and falls across
    the part it shares with the next one; at the image borders it stays 1. Where two tiles overlap the
    two ramps sum to 1. The ramps never reach 0, so every output pixel has a positive total weight, and
    `_blend` divides by that total (which matters only where three tiles overlap).
    """
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(length * scale)
        if i > 0:
            rise = (starts[i - 1] + length - start) * scale  # width shared with the previous tile
            w[:rise] = torch.minimum(w[:rise], (torch.arange(rise) + 0.5) / rise)
        if i + 1 < len(starts):
            fall = (start + length - starts[i + 1]) * scale  # width shared with the next tile
            w[-fall:] = torch.minimum(w[-fall:], (torch.arange(fall, 0, -1) - 0.5) / fall)
        weights.append(w)
    return weights


def _blend(
    fn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> list[torch.Tensor]:
    """Apply `fn` to overlapping tiles of `x` and blend its outputs into whole-size float32 tensors.

    Sizes are counted in units: a unit is `in_scale` pixels of `x` and `out_scale` pixels of each
    output (decode: 1 latent pixel -> f image pixels; encode: f image pixels -> 1 latent pixel).
    """
    (rows, tile_h), (cols, tile_w) = (tile_layout(n // in_scale, tile, overlap) for n in x.shape[-2:])
    row_w, col_w = ramp_weights(rows, tile_h, out_scale), ramp_weights(cols, tile_w, out_scale)
    outputs: list[torch.Tensor] = []
    total = torch.zeros(x.shape[-2] // in_scale * out_scale, x.shape[-1] // in_scale * out_scale, device=x.device)
    for r, top in enumerate(rows):
        for c, left in enumerate(cols):
            piece = x[..., top * in_scale : (top + tile_h) * in_scale, left * in_scale : (left + tile_w) * in_scale]
            results = fn(piece)
            weight = (row_w[r][:, None] * col_w[c][None, :]).to(x.device)  # (h, w) of this tile's output
            window = (
                slice(top * out_scale, top * out_scale + weight.shape[0]),
                slice(left * out_scale, left * out_scale + weight.shape[1]),
            )
            if not outputs:  # allocated once the first tile shows the batch and channel sizes
                outputs = [t.new_zeros((*t.shape[:-2], *total.shape), dtype=torch.float32) for t in results]
            for out, result in zip(outputs, results, strict=True):
                out[(..., *window)] += result.float() * weight
            total[window] += weight
    return [out / total for out in outputs]


@torch.inference_mode()
def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 16) -> torch.Tensor:
    """Unscaled latents (B, 4, h, w) -> image (B, 3, fh, fw) in float32, decoded in blended tiles.

    Tiles are at most `tile_latent` latent pixels on a side (64 = 512 image pixels for SD, the training
    size) and overlap by at least `overlap_latent` (see `tile_layout`). A latent no larger than one tile
    is decoded whole.
    """
    if z.shape[-2] <= tile_latent and z.shape[-1] <= tile_latent:
        return vae.decode(z).float()
    (image,) = _blend(lambda piece: (vae.decode(piece),), z, tile_latent, overlap_latent, 1, vae.downscale)
    return image


@torch.inference_mode()
def encode_tiled(
    vae: AutoencoderKL, x: torch.Tensor, tile: int = 512, overlap: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (B, 3, H, W) in [-1, 1] -> latent mean and log-variance (B, 4, H/f, W/f) in float32, in tiles.

    `tile` and `overlap` are image pixels and are rounded down to multiples of the VAE's downscale
    factor f; H and W must be multiples of f. The moments are blended as diffusers' tiled encode does.
    """
    f = vae.downscale
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE's factor {f}")
    if x.shape[-2] <= tile and x.shape[-1] <= tile:
        mean, logvar = vae.encode(x)
        return mean.float(), logvar.float()
    mean, logvar = _blend(vae.encode, x, tile // f, overlap // f, f, 1)
    return mean, logvar


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure: CUDA's OutOfMemoryError, or the CPU's and MPS's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES)


@torch.inference_mode()
def decode(
    vae: AutoencoderKL,
    z: torch.Tensor,
    *,
    tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
    tile_latent: int = 64,
    overlap_latent: int = 16,
) -> torch.Tensor:
    """Unscaled latents (B, 4, h, w) -> image (B, 3, fh, fw) in float32: the decode the pipeline uses.

    `tiling`: True always tiles; False never does; None (auto) tiles when an untiled decode would need
    more than half the free memory (`fits_untiled`) and retries in tiles after running out of memory.
    If a half-precision VAE gives non-finite values (some VAEs overflow in fp16), the latents are decoded
    again by a temporary fp32 copy of the VAE. Each fallback is reported through `warn` (default:
    `warnings.warn`) in one line.
    """

    def run(module: AutoencoderKL, latents: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, ...]:
        image = decode_tiled(module, latents, tile_latent, overlap_latent) if tiled else module.decode(latents)
        return (image.float(),)

    f = vae.downscale
    (image,) = _with_fallbacks(vae, z, run, tiling, warn, "decode", (z.shape[-1] * f, z.shape[-2] * f))
    return image


@torch.inference_mode()
def encode(
    vae: AutoencoderKL,
    x: torch.Tensor,
    *,
    tiling: bool | None = None,
    warn: Callable[[str], None] | None = None,
    tile: int = 512,
    overlap: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (B, 3, H, W) in [-1, 1] -> latent mean and log-variance in float32, with `decode`'s policy.

    The same rules as `decode`: tiles when asked, when free memory is short or after running out of
    memory (unless `tiling` is False), and an fp32 encode when half precision gives non-finite values.
    """

    def run(module: AutoencoderKL, image: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, ...]:
        moments = encode_tiled(module, image, tile, overlap) if tiled else module.encode(image)
        return tuple(m.float() for m in moments)

    mean, logvar = _with_fallbacks(vae, x, run, tiling, warn, "encode", (x.shape[-1], x.shape[-2]))
    return mean, logvar


def _with_fallbacks(
    vae: AutoencoderKL,
    x: torch.Tensor,
    run: Callable[[AutoencoderKL, torch.Tensor, bool], tuple[torch.Tensor, ...]],
    tiling: bool | None,
    warn: Callable[[str], None] | None,
    what: str,
    pixels: tuple[int, int],
) -> tuple[torch.Tensor, ...]:
    """`run(vae, x, tiled)` with the tiling decision, the tiled retry after OOM and the fp32 redo."""
    report = warn or _warn
    x = x.to(next(vae.parameters()).dtype)
    tiled = tiling if tiling is not None else not fits_untiled(vae, x, pixels)
    try:
        outputs = run(vae, x, tiled)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if tiled or tiling is False or not is_out_of_memory(e):
            raise
        report(f"VAE {what} ran out of memory at {pixels[0]}x{pixels[1]}; {what[:-1]}ing in tiles instead")
        _release_cached_memory(x.device)
        tiled = True
        outputs = run(vae, x, tiled)
    if x.dtype in HALF_DTYPES and not all(torch.isfinite(t).all() for t in outputs):
        report(f"VAE {what} in {_dtype_name(x.dtype)} gave non-finite values; {what[:-1]}ing again in fp32")
        del outputs
        with torch.inference_mode(False), torch.no_grad():  # an ordinary module, not inference tensors
            vae32 = copy.deepcopy(vae).float()
        outputs = run(vae32, x.float(), tiled)
    return outputs


def fits_untiled(vae: AutoencoderKL, x: torch.Tensor, pixels: tuple[int, int]) -> bool:
    """Whether an untiled pass over `x` (B images of `pixels`) fits comfortably in the free memory.

    Untiled is about twice as fast as tiles and has no seams, so a CPU with RAM to spare or a large GPU
    decodes 1024x1024 whole, while a small GPU tiles before it runs out. Where free memory cannot be
    read (Apple MPS, non-Linux CPUs), the fixed size threshold decides.
    """
    free = available_memory(x.device)
    if free is None:
        return pixels[0] * pixels[1] // vae.downscale**2 <= AUTO_TILE_LATENT_AREA
    widest = vae.cfg.ch * max(vae.cfg.ch_mult[:2])  # the level that upsamples to full resolution
    need = x.shape[0] * pixels[0] * pixels[1] * FULL_RESOLUTION_MAPS * widest * x.element_size()
    return need <= FREE_MEMORY_SHARE * free


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free plus PyTorch's cache; Linux CPU:
    MemAvailable), or None where that is unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _warn(message: str) -> None:
    # Frames: _warn, _with_fallbacks, decode/encode, torch's inference_mode wrapper, then the caller.
    warnings.warn(message, RuntimeWarning, stacklevel=5)
