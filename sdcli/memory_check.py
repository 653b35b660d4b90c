"""Whether a batch fits in the device's free memory, estimated before the model loads.

A size or batch far beyond the device would otherwise allocate until the process dies; checked up front it
is one line saying what would help. The estimate is a sum of three parts, each a rule set at or above what
was measured, so that a job it refuses would really not have run:

- the weights, at the dtype they are cast to (nothing on the compute device with `--low-memory` on a GPU:
  there the networks wait on the CPU);
- the UNet's activations at the latent size. Attention runs through `scaled_dot_product_attention`, whose
  fused kernels never hold the tokens x tokens matrix, so the largest terms are the feature maps of the first
  level that has attention, `model_channels` wide at the full latent size (`UNET_MAPS` of them per image);
- the VAE decode: an untiled pass needs `tiling.FULL_RESOLUTION_MAPS` maps of the widest full-resolution
  channel count per image (the rule `tiling.fits_untiled` uses); a tiled one (forced, or auto, which tiles
  when the whole pass would not fit) that of one tile, plus the float32 output image either way.

Text encoders' activations (77 tokens) are negligible and left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdcli.tiling import FULL_RESOLUTION_MAPS

if TYPE_CHECKING:
    from sdcli.families import Family
    from sdcli.header import TensorInfo

# Feature maps `model_channels` x h x w per image at the peak of the UNet's first level with attention (SD 1.x,
# SD 2.x). Counted: 5.4 for the skip connections kept for the up path (3 at the first level, then 3 x 2C at
# 1/4 the area, 3 x 4C at 1/16, 3 x 4C at 1/64); 16 inside a transformer block's feed-forward (its GEGLU
# projection, 8C wide, then the gate's GELU and the product, 4C each); 3 for the residual stream, its norm
# and the block's input: about 24, before the kernels' own buffers. Measured (peak RSS growth over one fp32
# forward of batch 2 on a CPU, the SD 1.x UNet at model_channels 64, 128 and 320, latents 64 to 128): 32 to
# 38. Hence 40. SDXL has no attention at its first level: measured the same way, 20.
UNET_MAPS = 40
# A tiled decode works on tiles of this many latent pixels a side (`tiling.decode_tiled`'s default).
TILE_LATENT = 64
FLOAT32_BYTES = 4
DEVICE_NAMES = {"cuda": "GPU", "cpu": "CPU"}


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one batch needs on the compute device, by part."""

    weights: int
    unet: int
    vae: int

    @property
    def total(self) -> int:
        return self.weights + self.unet + self.vae


def weights_bytes(infos: dict[str, TensorInfo], family: Family, dtype_bytes: int) -> int:
    """The bytes of the networks' tensors once floating-point ones are cast to a `dtype_bytes`-wide dtype
    (from the header alone; other tensors keep their own width)."""
    from sdcli.families import UNET_PREFIX, VAE_PREFIX
    from sdcli.header import DTYPE_BITS

    prefixes = (UNET_PREFIX, VAE_PREFIX, *(spec.prefix for spec in family.text_encoders))
    total = 0
    for key, info in infos.items():
        if key.startswith(prefixes):
            elements = math.prod(info.shape)
            floating = info.dtype.startswith(("F", "BF"))
            total += elements * dtype_bytes if floating else elements * DTYPE_BITS.get(info.dtype, 64) // 8
    return total


def estimate(
    family: Family,
    width: int,
    height: int,
    batch_size: int,
    *,
    cfg: float,
    dtype_bytes: int,
    weights: int,
    vae_tiled: bool,
    vae_dtype_bytes: int | None = None,
) -> MemoryEstimate:
    """The peak memory of one batch of `batch_size` images of `width` x `height` (see the module's rules).

    `weights` is the weights' bytes on the compute device (0 when they wait on the CPU); the UNet runs the
    batch twice as wide when `cfg` > 1 (the unconditional branch); `vae_tiled` is True when the decode may
    tile (forced or auto); the VAE runs in `vae_dtype_bytes` (default: `dtype_bytes`).
    """
    f = 2 ** (len(family.vae.ch_mult) - 1)  # the VAE's downscale factor
    latent_area = (width // f) * (height // f)
    unet_batch = batch_size * (2 if cfg > 1 else 1)
    unet = UNET_MAPS * family.unet.model_channels * latent_area * unet_batch * dtype_bytes
    widest = family.vae.ch * max(family.vae.ch_mult[:2])  # the level that upsamples to full resolution
    pass_area = min(width, TILE_LATENT * f) * min(height, TILE_LATENT * f) if vae_tiled else width * height
    vae_pass = FULL_RESOLUTION_MAPS * widest * pass_area * batch_size * (vae_dtype_bytes or dtype_bytes)
    output = 3 * width * height * batch_size * FLOAT32_BYTES
    return MemoryEstimate(weights, unet, vae_pass + output)


def gigabytes(count: int) -> str:
    """Bytes for a message: "2.1 GB", or "12 MB" below a tenth of a GB."""
    return f"{count / 1e9:.1f} GB" if count >= 10**8 else f"{count / 1e6:.0f} MB"


def too_large_message(
    need: MemoryEstimate,
    free: int,
    width: int,
    height: int,
    batch_size: int,
    *,
    device: str,
    can_tile: bool,
    can_offload: bool,
) -> str:
    """One line: what needs how much, what is free, and what would help. `can_tile`: tiling is off
    (`--no-vae-tiling`); `can_offload`: a GPU without `--low-memory`."""
    batch = f" in batches of {batch_size}" if batch_size > 1 else ""
    helps = []
    if can_tile and need.vae >= need.unet:
        helps.append("--vae-tiling")
    if can_offload and need.weights:
        helps.append("--low-memory")
    if batch_size > 1:
        helps.append("a smaller --batch-size")
    helps.append("a smaller size")
    return (
        f"{width}x{height}{batch} needs about {gigabytes(need.total)} of memory (weights "
        f"{gigabytes(need.weights)}, UNet {gigabytes(need.unet)}, VAE decode {gigabytes(need.vae)}) but only "
        f"{gigabytes(free)} is free on the {device}: try {', '.join(helps[:-1]) + ' or ' if len(helps) > 1 else ''}"
        f"{helps[-1]}"
    )


def check_fits(
    requests: list,
    family: Family,
    infos: dict[str, TensorInfo],
    *,
    batch_size: int,
    device,
    dtype,
    free: int | None,
    low_memory: bool,
    vae_tiling: bool | None,
    loaded: bool = False,
) -> None:
    """Raise SdcliError (one line, `too_large_message`) when a batch of `requests` (GenerationRequests, run
    `batch_size` at a time on `device` in `dtype`) would need more than the `free` bytes; None: unknown,
    nothing is checked. `loaded`: the weights are in memory already (a server's model), so `free` is what
    is left beside them."""
    if free is None:
        return
    import torch

    from sdcli.checkpoint import vae_dtype
    from sdcli.errors import SdcliError

    size = torch.empty(0, dtype=dtype).element_size()
    vae_size = torch.empty(0, dtype=vae_dtype(family, dtype, device)).element_size()
    offloaded = low_memory and device.type != "cpu"
    weights = 0 if offloaded or loaded else weights_bytes(infos, family, size)
    counts: dict[tuple[int, int, bool], int] = {}
    for r in requests:  # batches hold requests of one size and cfg (among other settings)
        key = (r.width, r.height, r.cfg > 1)
        counts[key] = counts.get(key, 0) + 1
    for (width, height, guided), count in counts.items():
        batch = min(batch_size, count)
        need = estimate(
            family, width, height, batch, cfg=2.0 if guided else 1.0, dtype_bytes=size, weights=weights,
            vae_tiled=vae_tiling is not False, vae_dtype_bytes=vae_size,
        )  # fmt: skip
        if need.total > free:
            name = DEVICE_NAMES.get(device.type, device.type)
            can_offload = device.type != "cpu" and not low_memory
            message = too_large_message(
                need, free, width, height, batch, device=name, can_tile=vae_tiling is False, can_offload=can_offload
            )
            raise SdcliError(message)
