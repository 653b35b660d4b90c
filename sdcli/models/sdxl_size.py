"""SDXL's extra UNet input `y`: the pooled text embedding followed by the image-size conditioning.

Stability's `sgm` builds it with one ConcatTimestepEmbedderND per pair (original size, crop top-left,
target size; the refiner: original size, crop top-left, aesthetic score): each number gets the UNet's
sinusoidal timestep embedding, 256 wide, and all are concatenated after the pooled embedding. diffusers passes
the same numbers as `time_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdcli.models.layers import timestep_embedding

SIZE_EMBEDDING_DIM = 256  # per number: six numbers make 1536 of SDXL's 2816, five 1280 of the refiner's 2560


def sdxl_y(pooled: torch.Tensor, sizes: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(B, P) pooled text embedding and N numbers -> the UNet's `y`, (B, P + N * 256).

    `sizes` is (original height, original width, crop top, crop left, target height, target width) for SDXL
    base, (original height, original width, crop top, crop left, aesthetic score) for the refiner, either one
    sequence for the whole batch or a (B, N) tensor, in the order of sgm's embedders and diffusers' `time_ids`.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float32, device=pooled.device)
    sizes = sizes.expand(pooled.shape[0], -1) if sizes.ndim == 1 else sizes  # (B, N)
    b, n = sizes.shape
    emb = timestep_embedding(sizes.reshape(b * n), SIZE_EMBEDDING_DIM).reshape(b, n * SIZE_EMBEDDING_DIM)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)  # (B, P + 6 * 256)
