"""The linear latent -> RGB preview: shapes and dtypes, and that it is the documented per-pixel map."""

from __future__ import annotations

import pytest
import torch

from sdcli.preview import SD_LATENT_RGB, SDXL_LATENT_RGB, approximate_rgb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_batch_size_and_dtype_and_gives_three_channels(dtype):
    latents = torch.randn(2, 4, 5, 7).to(dtype)
    rgb = approximate_rgb(latents)
    assert rgb.shape == (2, 3, 5, 7)
    assert rgb.dtype == dtype


@pytest.mark.parametrize("factors", [SD_LATENT_RGB, SDXL_LATENT_RGB])
def test_each_pixel_is_the_latent_channels_times_the_factor_rows(factors):
    """A1111's cheap_approximation: rgb[r] = sum over latent channels l of latent[l] * factors[l][r]."""
    assert len(factors) == 4 and all(len(row) == 3 for row in factors)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    rgb = approximate_rgb(latents, factors)
    for b, y, x in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        for r in range(3):
            expected = sum(latents[b, channel, y, x].item() * factors[channel][r] for channel in range(4))
            assert rgb[b, r, y, x].item() == pytest.approx(expected, abs=1e-12)


def test_sd_factors_are_keturns_table():
    """The cited table's corners: the first latent channel's red and the fourth's blue."""
    assert SD_LATENT_RGB[0][0] == 0.298
    assert SD_LATENT_RGB[3][2] == -0.473
