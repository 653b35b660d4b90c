"""Each image's own noise stream, so an image comes out the same alone or in a batch (A1111's ImageRNG).

An image draws, in order: its initial noise, then one unit Gaussian of the latent's shape per noise call
of the sampler (ancestral and SDE steps). Under `--rng cpu` all of it comes from a torch CPU generator
seeded with the image's seed, and the img2img/inpaint encode noise (a sample of the VAE's latent
distribution) is drawn from it too, between the initial noise and the sampler's.

Under `--rng cuda` it comes from a Philox stream keyed by the seed (sdcli.rng_philox), as A1111's "NV"
source draws it: one call per draw, each call one Philox counter step further (A1111's `Generator.offset`
+ 1, torch's CUDA offset + 4), the initial noise at step 0, the sampler's first noise at step 1. That is
what a CUDA generator seeded for the image gives for successive `torch.randn` of a latent, which A1111's
"GPU" source draws, as long as the latent fits the GPU's resident threads (multiprocessors x threads per
multiprocessor: 270,336 on an H100, 30,720 on an RTX 3050; a 512x512 SD latent has 16,384 values, a
1024x1024 SDXL one 65,536). A larger one is laid out, and moves the offset on, by a rule that depends on
the GPU; the "NV" source, and sdcli, lay it out as if it fitted.
A1111 draws the encode noise from torch's global generator, outside the image's stream; here it comes from
the same Philox key at counter high word 1 (offset 4 * 2^32), a part of the stream the sampler's calls
(the low word) never reach, so the sampler's noise keeps A1111's counter steps in img2img too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdcli.rng_philox import NORMALS_PER_DRAW, CudaRandn

ENCODE_OFFSET = NORMALS_PER_DRAW << 32  # a Philox counter of (0, 1, thread, 0): beyond any sampler draw


class ImageNoise:
    """One image's noise: `next` draws its stream in order; `for_encoding` the VAE sample's noise."""

    def __init__(self, seed: int, rng: str = "cpu") -> None:
        if rng == "cuda":
            self._stream: torch.Generator | CudaRandn = CudaRandn(seed)
            self._encoding: torch.Generator | CudaRandn = CudaRandn(seed, offset=ENCODE_OFFSET)
        elif rng == "cpu":
            self._stream = self._encoding = torch.Generator("cpu").manual_seed(seed)
        else:
            raise ValueError(f"rng must be cpu or cuda, got {rng!r}")

    def next(self, shape: Sequence[int]) -> torch.Tensor:
        """The stream's next unit Gaussian of `shape`, float32 on the CPU."""
        return _draw(self._stream, shape)

    def for_encoding(self, shape: Sequence[int]) -> torch.Tensor:
        """The next unit Gaussian for sampling the VAE's latent distribution, float32 on the CPU."""
        return _draw(self._encoding, shape)


def _draw(source: torch.Generator | CudaRandn, shape: Sequence[int]) -> torch.Tensor:
    if isinstance(source, CudaRandn):
        return source.randn(shape)
    return torch.randn(tuple(shape), generator=source)


class BatchNoise:
    """The noise streams of a batch, one per image: each draw is every image's next draw, stacked (B, ...)."""

    def __init__(self, seeds: Sequence[int], rngs: Sequence[str]) -> None:
        if len(seeds) != len(rngs):
            raise ValueError(f"got {len(seeds)} seeds and {len(rngs)} rng sources")
        self.images = [ImageNoise(seed, rng) for seed, rng in zip(seeds, rngs, strict=True)]

    def next(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """Each image's next unit Gaussian of `shape` (one image's), stacked (B, *shape) on `device`."""
        return torch.cat([image.next((1, *shape)) for image in self.images]).to(device)

    def for_encoding(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """Each image's next encode noise of `shape` (one image's), stacked (B, *shape) on `device`."""
        return torch.cat([image.for_encoding((1, *shape)) for image in self.images]).to(device)
