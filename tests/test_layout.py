"""The full-size SD 1.5 layout: the keys and shapes our modules hold are those diffusers' conversion expects.

Built on the meta device: our modules' state dicts with the file prefixes go through the reference
conversion, and must load strictly (same keys, same shapes) into the full-size reference models.
"""

import torch
from reference import reference_clip, reference_unet, reference_vae

from sdcli.families import CLIP_PREFIX, SD1, SD1_INPAINT, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.models.clip import ClipTextModel
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL


def meta_state_dict(module_cls, cfg):
    with torch.device("meta"):
        return module_cls(cfg).state_dict()


def test_sd15_unet_layout_matches_reference_conversion():
    for family in (SD1, SD1_INPAINT):
        sd = meta_state_dict(UNetModel, family.unet)
        ref = reference_unet(sd, family.unet, family.vae, device="meta")  # strict load: raises on any mismatch
        assert ref.config.in_channels == family.unet.in_channels
        assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in ref.parameters())


def test_sd15_vae_layout_matches_reference_conversion():
    sd = meta_state_dict(AutoencoderKL, SD1.vae)
    ref = reference_vae(sd, SD1.unet, SD1.vae, device="meta")
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in ref.parameters())


def test_sd15_clip_layout_matches_reference_conversion():
    sd = meta_state_dict(ClipTextModel, SD1.text_encoders[0].config)
    ref = reference_clip(sd, SD1.text_encoders[0].config, device="meta")
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in ref.parameters())


def test_detect_reads_the_full_size_families_back_from_their_shapes():
    for family in (SD1, SD1_INPAINT):
        shapes = {}
        for prefix, cls, cfg in (
            (UNET_PREFIX, UNetModel, family.unet),
            (VAE_PREFIX, AutoencoderKL, family.vae),
            (CLIP_PREFIX, ClipTextModel, family.text_encoders[0].config),
        ):
            shapes.update({prefix + k: tuple(v.shape) for k, v in meta_state_dict(cls, cfg).items()})
        assert detect(shapes) == family
