"""Each network equals the reference (diffusers / transformers) on the same random weights, in fp32."""

import pytest
import torch
from conftest import TINY_CLIPS, TINY_UNETS, TINY_VAES, randomize_
from reference import assert_close, reference_clip, reference_unet, reference_vae

from sdcli.models.clip import ClipTextModel
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
@pytest.mark.parametrize("size", [(16, 24), (9, 13)])  # odd latent sizes: upsampling must meet the skip's size
def test_unet_matches_diffusers(name, size):
    cfg = TINY_UNETS[name]
    ours = randomize_(UNetModel(cfg), seed=1)
    ref = reference_unet(ours.state_dict(), cfg, TINY_VAES["a"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 1.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        actual = ours(x, t, context)
    assert_close(actual, expected)


@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_vae_matches_diffusers(name):
    cfg = TINY_VAES[name]
    ours = randomize_(AutoencoderKL(cfg), seed=2)
    ref = reference_vae(ours.state_dict(), TINY_UNETS["a"], cfg)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    f = ours.downscale
    z = torch.randn(2, cfg.embed_dim, 32 // f, 48 // f, generator=g)
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        mean, logvar = ours.encode(image)
        assert_close(mean, dist.mean)
        assert_close(logvar, dist.logvar)
        assert_close(ours.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("name", sorted(TINY_CLIPS))
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_matches_transformers(name, clip_skip):
    cfg = TINY_CLIPS[name]
    ours = randomize_(ClipTextModel(cfg), seed=3)
    ref = reference_clip(ours.state_dict(), cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_position_embeddings), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        # A1111's clip skip: the hidden state `clip_skip` layers from the end, then the final layer norm.
        expected = out.last_hidden_state if clip_skip == 1 else ref.final_layer_norm(out.hidden_states[-clip_skip])
        assert_close(ours(ids, clip_skip=clip_skip), expected)


def test_clip_skip_out_of_range_is_an_error():
    model = ClipTextModel(TINY_CLIPS["a"])
    with pytest.raises(ValueError, match="clip_skip"):
        model(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_half_precision_group_norm_keeps_float32_statistics(dtype, memory_format):
    from sdcli.models.layers import group_norm

    norm = randomize_(group_norm(64, 32, eps=1e-6))
    # A large mean next to a small spread: half-precision statistics would lose the spread.
    x = (torch.randn(2, 64, 24, 40) * 0.5 + 300).to(dtype).contiguous(memory_format=memory_format)
    half = norm.to(dtype)
    expected = torch.nn.functional.group_norm(x.float(), 32, half.weight.float(), half.bias.float(), 1e-6)
    out = half(x)
    assert out.dtype == dtype
    # Rounding-level differences only (in bf16, 300's own spacing is 2: the spread is below it).
    assert (out.float() - expected).abs().max() <= 2 * torch.finfo(dtype).eps * expected.abs().max()
