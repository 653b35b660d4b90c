"""TAESD equals diffusers' AutoencoderTiny on the same random weights, loaded from either file layout."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import randomize_
from diffusers import AutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from reference import assert_close
from safetensors.torch import save_file

from sdcli.errors import CheckpointError
from sdcli.models.configs import TAESD, TaesdConfig
from sdcli.models.taesd import Block, Decoder, Encoder, load_taesd

# Narrower than the real 64 channels; "b" has three stages (4x) and 16 latent channels as taef1 has.
TINY_TAESDS = {
    "a": TaesdConfig(channels=8, encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1)),
    "b": TaesdConfig(channels=12, latent_channels=16, encoder_blocks=(1, 2, 2), decoder_blocks=(2, 2, 1)),
}


def reference_tiny(cfg: TaesdConfig) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny in `cfg`'s shape (diffusers needs one width for every stage)."""
    return AutoencoderTiny(
        in_channels=cfg.image_channels,
        out_channels=cfg.image_channels,
        encoder_block_out_channels=(cfg.channels,) * len(cfg.encoder_blocks),
        decoder_block_out_channels=(cfg.channels,) * len(cfg.decoder_blocks),
        latent_channels=cfg.latent_channels,
        num_encoder_blocks=cfg.encoder_blocks,
        num_decoder_blocks=cfg.decoder_blocks,
    )


def original_layout(diffusers_state: dict) -> tuple[dict, dict]:
    """diffusers' keys -> the original taesd_encoder / taesd_decoder keys, inverting the rule of diffusers'
    `scripts/convert_tiny_autoencoder_to_diffusers.py` (encoder keys prefixed; decoder indices shifted by -1)."""
    encoder, decoder = {}, {}
    for key, value in diffusers_state.items():
        part, _, rest = key.removeprefix("encoder.layers.").removeprefix("decoder.layers.").partition(".")
        if key.startswith("encoder.layers."):
            encoder[f"{part}.{rest}"] = value
        else:
            assert key.startswith("decoder.layers."), key
            decoder[f"{int(part) + 1}.{rest}"] = value
    return encoder, decoder


def write(path, state: dict) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(params=sorted(TINY_TAESDS))
def tiny(request, tmp_path):
    """(config, diffusers model with random weights, the combined file, the original encoder and decoder files)."""
    cfg = TINY_TAESDS[request.param]
    ref = randomize_(reference_tiny(cfg), seed=4)
    state = ref.state_dict()
    encoder, decoder = original_layout(state)
    files = (
        write(tmp_path / "diffusion_pytorch_model.safetensors", state),
        write(tmp_path / "taesd_encoder.safetensors", encoder),
        write(tmp_path / "taesd_decoder.safetensors", decoder),
    )
    return cfg, ref, files


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_encode_and_decode_match_autoencoder_tiny(tiny, layout):
    cfg, ref, (combined, encoder_file, decoder_file) = tiny
    ours = load_taesd([combined] if layout == "diffusers" else [decoder_file, encoder_file], cfg=cfg)
    g = torch.Generator().manual_seed(0)
    f = ours.downscale
    images = torch.rand(2, 3, 4 * f, 6 * f, generator=g) * 2 - 1
    latents = torch.randn(2, cfg.latent_channels, 4, 6, generator=g) * 2
    with torch.no_grad():
        # As diffusers' pipelines use it: latents = encode(x).latents * scaling_factor, decode(z / scaling_factor).
        expected_latents = ref.encode(images).latents * ref.config.scaling_factor
        expected_images = ref.decode(latents / ref.config.scaling_factor).sample
        assert_close(ours.encode(images), expected_latents)
        assert_close(ours.decode(latents), expected_images)


def test_taesd_latents_are_the_samplers_latents():
    """diffusers' AutoencoderTiny has scaling factor 1: its latents are already the scaled ones the UNet sees."""
    assert AutoencoderTiny().config.scaling_factor == 1.0


def test_block_with_a_width_change_matches_diffusers():
    ours = randomize_(Block(4, 8), seed=5)
    ref = AutoencoderTinyBlock(4, 8, "relu")
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names: conv.0/2/4 and the 1x1 skip
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(x), ref(x))


def test_full_size_layout_equals_autoencoder_tiny():
    with torch.device("meta"):
        ref = AutoencoderTiny().state_dict()
        encoder, decoder = Encoder(TAESD).state_dict(), Decoder(TAESD).state_dict()
    expected_encoder, expected_decoder = original_layout(ref)
    assert {k: v.shape for k, v in encoder.items()} == {k: v.shape for k, v in expected_encoder.items()}
    assert {k: v.shape for k, v in decoder.items()} == {k: v.shape for k, v in expected_decoder.items()}
    # The parameter counts in the comparison table of madebyollin/taesd's README.
    assert sum(v.numel() for v in encoder.values()) == 1_222_532
    assert sum(v.numel() for v in decoder.values()) == 1_222_531


def test_decoder_alone_decodes_and_encoding_then_says_what_is_missing(tiny):
    cfg, _, (_, _, decoder_file) = tiny
    ours = load_taesd([decoder_file], cfg=cfg)
    f = ours.downscale
    assert ours.decode(torch.zeros(1, cfg.latent_channels, 2, 2)).shape == (1, 3, 2 * f, 2 * f)
    with pytest.raises(CheckpointError, match="no TAESD encoder is loaded"):
        ours.encode(torch.zeros(1, 3, 8, 8))


def test_loads_into_the_requested_dtype(tiny):
    cfg, _, (combined, _, _) = tiny
    ours = load_taesd([combined], dtype=torch.bfloat16, cfg=cfg)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ours.parameters())


def one_line_error(paths, cfg, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_taesd(paths, cfg=cfg)
    assert "\n" not in str(e.value)


def test_missing_unexpected_and_misshapen_keys_are_one_line_errors(tiny, tmp_path):
    cfg, ref, _ = tiny
    encoder, decoder = original_layout(ref.state_dict())
    missing = write(tmp_path / "missing.safetensors", {k: v for k, v in decoder.items() if k != "1.bias"})
    one_line_error([missing], cfg, r"not a TAESD decoder file \(missing 1.bias\)")
    extra = write(tmp_path / "extra.safetensors", {**encoder, "99.weight": torch.zeros(1)})
    one_line_error([extra], cfg, r"not a TAESD encoder file \(unexpected 99.weight\)")
    shape = write(tmp_path / "shape.safetensors", {**encoder, "0.bias": torch.zeros(3)})
    one_line_error([shape], cfg, r"not a TAESD encoder file \(wrong shape for 0.bias \(3,\)")
    combined = {k: v for k, v in ref.state_dict().items() if k != "decoder.layers.0.bias"}
    one_line_error([write(tmp_path / "no_bias.safetensors", combined)], cfg, r"missing decoder.layers.0.bias\)")
    stray = {**ref.state_dict(), "first_stage_model.x": torch.zeros(1)}
    one_line_error([write(tmp_path / "stray.safetensors", stray)], cfg, "unexpected first_stage_model.x")


def test_a_full_size_file_for_a_tiny_config_names_the_wrong_shapes(tmp_path):
    path = write(tmp_path / "taesd_decoder.safetensors", Decoder(TAESD).state_dict())
    expected = r"wrong shape for 1.weight \(64, 4, 3, 3\) \(expected \(8, 4, 3, 3\)\)"
    one_line_error([path], replace(TAESD, channels=8), expected)


def test_two_decoders_or_no_file_are_errors(tiny):
    cfg, _, (combined, _, decoder_file) = tiny
    one_line_error([combined, decoder_file], cfg, "a second TAESD decoder")
    one_line_error([], cfg, "no TAESD file given")


def test_a_pickle_is_refused(tmp_path):
    path = tmp_path / "taesd_decoder.pth"
    path.write_bytes(b"\x80\x02")
    one_line_error([path], TAESD, "pickles")
