"""The cheapest preview of latents: each pixel's RGB a fixed linear map of its latent channels, no network.

Used when no TAESD decoder is at hand. The factors are the ones A1111 uses for its "Approx cheap" live
preview (`modules/sd_vae_approx.py`, `cheap_approximation`), fitted by Keturn for SD 1.x
(https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2); the SDXL rows are
A1111's for SDXL's own VAE. Rows are the latent channels, columns R, G, B. They apply to the samplers'
(scaled) latents and give RGB in about [-1, 1], as the VAE's decode does, at the latents' resolution.
"""

from __future__ import annotations

import torch

LatentRgbFactors = tuple[tuple[float, float, float], ...]

# SD 1.x and 2.x (the same KL VAE).
SD_LATENT_RGB: LatentRgbFactors = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
SDXL_LATENT_RGB: LatentRgbFactors = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


def approximate_rgb(latents: torch.Tensor, factors: LatentRgbFactors = SD_LATENT_RGB) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> RGB in about [-1, 1] (B, 3, h, w), in the latents' dtype and device.

    Upscale (e.g. nearest, x8) for a preview at the image's size; clamp before writing it.
    """
    matrix = torch.tensor(factors, dtype=latents.dtype, device=latents.device)  # (4, 3)
    return torch.einsum("bchw,cr->brhw", latents, matrix)  # (B, 3, h, w)
