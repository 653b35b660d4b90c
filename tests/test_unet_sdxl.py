"""The UNet in SD 2.x and SDXL shapes equals diffusers' on the same random weights, in fp32.

SDXL's UNet takes the vector `y` (pooled text + six sinusoidal size embeddings, built by `sdxl_y`) where
diffusers takes `text_embeds` and `time_ids` and builds the same vector itself: the test runs both paths.
"""

import pytest
import torch
from conftest import TINY_VAES, randomize_
from reference import assert_close, reference_unet, reference_unet_sdxl

from sdcli.families import UNetConfig
from sdcli.models.sdxl_size import SIZE_EMBEDDING_DIM, sdxl_y
from sdcli.models.unet import UNetModel

# SD 2.x: 64-wide heads (here 16), linear proj_in/proj_out, no attention at the deepest level.
TINY_SD2_UNETS = {
    "sd2": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        transformer_depth=(1, 1, 0),
        num_head_channels=16,
        context_dim=64,
        use_linear_in_transformer=True,
    ),
    "sd2-inpaint": UNetConfig(
        in_channels=9,
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=2,
        transformer_depth=(1, 0),
        num_head_channels=32,
        context_dim=40,
        use_linear_in_transformer=True,
    ),
}
# SDXL: no attention at the first level, deeper transformers below, a `label_emb` for y. diffusers only
# recognises SDXL by a 2048- or 1280-wide context.
TINY_SDXL_UNETS = {
    "xl-a": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        transformer_depth=(0, 1, 2),
        transformer_depth_middle=2,
        num_head_channels=16,
        context_dim=1280,
        use_linear_in_transformer=True,
        adm_in_channels=24 + 6 * SIZE_EMBEDDING_DIM,
    ),
    "xl-b": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=2,
        transformer_depth=(0, 3),
        transformer_depth_middle=3,
        num_head_channels=32,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=40 + 6 * SIZE_EMBEDDING_DIM,
    ),
}


def inputs(cfg: UNetConfig, size: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 1.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    return g, x, t, context


@pytest.mark.parametrize("name", sorted(TINY_SD2_UNETS))
def test_sd2_shaped_unet_matches_diffusers(name):
    cfg = TINY_SD2_UNETS[name]
    ours = randomize_(UNetModel(cfg), seed=7)
    ref = reference_unet(ours.state_dict(), cfg, TINY_VAES["a"])
    _, x, t, context = inputs(cfg, (16, 24))
    with torch.no_grad():
        assert_close(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample)


@pytest.mark.parametrize("name", sorted(TINY_SDXL_UNETS))
@pytest.mark.parametrize("size", [(16, 24), (9, 13)])
def test_sdxl_shaped_unet_with_size_vector_matches_diffusers_text_time(name, size):
    cfg = TINY_SDXL_UNETS[name]
    ours = randomize_(UNetModel(cfg), seed=8)
    ref = reference_unet_sdxl(ours.state_dict(), cfg)
    g, x, t, context = inputs(cfg, size)
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * SIZE_EMBEDDING_DIM, generator=g)
    # (original h, w, crop top, left, target h, w): one row as the defaults, one with a crop and upscale.
    sizes = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 32.0, 1024.0, 1536.0]])
    with torch.no_grad():
        expected = ref(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}
        ).sample
        assert_close(ours(x, t, context, y=sdxl_y(pooled, sizes)), expected)
        # One size row for the whole batch equals the same row repeated.
        assert torch.equal(sdxl_y(pooled, sizes[1].tolist()), sdxl_y(pooled, sizes[1].expand(2, -1)))


def test_sdxl_y_is_pooled_then_sgm_size_embeddings():
    # Written out from sgm's ConcatTimestepEmbedderND: each number's embedding is [cos(n f), sin(n f)] with
    # f = 10000^(-i/128), i = 0..127, concatenated in order after the pooled vector.
    pooled = torch.randn(1, 5)
    sizes = [1024, 768, 0, 16, 1024, 1024]
    y = sdxl_y(pooled, sizes)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    parts = [torch.cat([torch.cos(n * freqs), torch.sin(n * freqs)]) for n in sizes]
    assert torch.allclose(y, torch.cat([pooled[0], *parts])[None], atol=1e-5)


def test_unet_refuses_a_missing_or_unexpected_vector():
    sdxl = UNetModel(TINY_SDXL_UNETS["xl-a"])
    _, x, t, context = inputs(sdxl.cfg, (8, 8))
    with pytest.raises(ValueError, match="vector y"):
        sdxl(x, t, context)
    sd2 = UNetModel(TINY_SD2_UNETS["sd2"])
    with pytest.raises(ValueError, match="no vector y"):
        sd2(x, t, torch.zeros(2, 7, 64), y=torch.zeros(2, 4))
