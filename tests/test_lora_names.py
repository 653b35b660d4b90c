"""LoRA names at full size: every module diffusers' SD 2.1 and SDXL pipelines can adapt has an alias, on a
weight (or a block of its rows) of the same size.

Built on the meta device: diffusers' UNet from the published yaml and transformers' text towers from diffusers'
single-file conversion of our full-size modules (see test_layout_sd2_sdxl); each of their Linear and Conv2d
modules, named as a LoRA file would (`unet.`, `text_encoder.`, `text_encoder_2.` + its name), must resolve.
"""

import math

import torch
from reference import reference_clip_sdxl, reference_open_clip
from test_layout_sd2_sdxl import SD2_YAML, SDXL_YAML, meta_state_dict, reference_unet_from_yaml

from sdcli.convert import lora_aliases, lora_targets
from sdcli.families import SD2, SDXL, SDXL_BIGG_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX
from sdcli.models.clip import ClipTextModel
from sdcli.models.configs import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, SD2_UNET, SDXL_UNET
from sdcli.models.openclip import OpenClipTextModel
from sdcli.models.unet import UNetModel


def linear_and_conv_weights(model, prefix: str, kohya: str, kohya_name: str = "") -> dict[str, tuple]:
    """Each Linear/Conv2d of `model` as a diffusers/PEFT file names it -> (its weight's shape, its kohya name).

    kohya names a text encoder from `text_model.`, which transformers 5's CLIPTextModel no longer has (`kohya_name`).
    """
    return {
        prefix + name: (tuple(m.weight.shape), kohya + (kohya_name + name).replace(".", "_"))
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name != "text_projection"
    }


def assert_every_module_resolves(family, checkpoint: dict, modules: dict) -> None:
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    aliases = lora_aliases(lora_targets(family), shapes)
    for name, (shape, kohya) in modules.items():
        assert name in aliases, name
        _, key, rows = aliases[name]
        size = math.prod(shapes[key]) // (rows[1] if rows else 1)
        assert size == math.prod(shape), (name, key, rows)
        assert aliases[kohya] == aliases[name], kohya


def test_every_sdxl_module_has_a_lora_alias():
    checkpoint = meta_state_dict(UNetModel, SDXL_UNET, UNET_PREFIX)
    unet = reference_unet_from_yaml(SDXL_YAML, checkpoint)
    clip_l = meta_state_dict(ClipTextModel, CLIP_L)
    bigg = meta_state_dict(OpenClipTextModel, OPENCLIP_BIGG)
    modules = linear_and_conv_weights(unet, "unet.", "lora_unet_")
    clip_l_ref = reference_clip_sdxl(clip_l, CLIP_L, device="meta")
    modules |= linear_and_conv_weights(clip_l_ref, "text_encoder.", "lora_te1_", "text_model.")
    bigg_ref, _ = reference_open_clip(bigg, OPENCLIP_BIGG, SDXL_BIGG_PREFIX, device="meta")
    modules |= linear_and_conv_weights(bigg_ref, "text_encoder_2.", "lora_te2_")
    assert any(".add_embedding.linear_2" in name for name in modules)
    checkpoint |= {SDXL_CLIP_L_PREFIX + k: v for k, v in clip_l.items()}
    checkpoint |= {SDXL_BIGG_PREFIX + k: v for k, v in bigg.items()}
    assert_every_module_resolves(SDXL, checkpoint, modules)
    v = lora_aliases(lora_targets(SDXL), checkpoint)["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert (v.key, v.rows) == (SDXL_BIGG_PREFIX + "transformer.resblocks.31.attn.in_proj_weight", (2, 3))


def test_every_sd2_module_has_a_lora_alias():
    checkpoint = meta_state_dict(UNetModel, SD2_UNET, UNET_PREFIX)
    unet = reference_unet_from_yaml(SD2_YAML, checkpoint)
    tower = meta_state_dict(OpenClipTextModel, OPENCLIP_H)
    ref, _ = reference_open_clip(tower, OPENCLIP_H, SD2.text_encoders[0].prefix, device="meta")
    modules = linear_and_conv_weights(unet, "unet.", "lora_unet_")
    modules |= linear_and_conv_weights(ref, "text_encoder.", "lora_te_", "text_model.")
    checkpoint |= {SD2.text_encoders[0].prefix + k: v for k, v in tower.items()}
    assert_every_module_resolves(SD2, checkpoint, modules)
