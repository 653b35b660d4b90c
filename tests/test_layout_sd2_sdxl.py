"""The full-size SD 2.1 and SDXL base layouts: our modules hold the keys and shapes diffusers' conversion expects.

Built on the meta device. Our configs are checked against the published ones twice over: the UNets' original
yaml parameters (copied below from Stability's `v2-inference.yaml` and `sd_xl_base.yaml`) drive diffusers'
own config conversion, and the head counts, which shapes cannot show, are compared with OpenCLIP's model
configs and diffusers' attention modules.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from reference import reference_clip_sdxl, reference_open_clip

from sdcli.families import UNET_PREFIX, VAEConfig
from sdcli.models.clip import ClipTextModel
from sdcli.models.configs import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, SD2_UNET, SDXL_UNET
from sdcli.models.openclip import OpenClipTextModel
from sdcli.models.unet import CrossAttention, UNetModel
from sdcli.models.vae import AutoencoderKL

SD2_TEXT = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_BIGG = "conditioner.embedders.1.model."
# model.params.unet_config.params of Stability's configs/stable-diffusion/v2-inference.yaml ...
SD2_YAML = {
    "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}  # fmt: skip
# ... and model.params.network_config.params of generative-models' configs/inference/sd_xl_base.yaml.
SDXL_YAML = {
    "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
    "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 10], "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers",
    "legacy": False,
}  # fmt: skip
# Head counts from OpenCLIP's model configs ViT-H-14.json and ViT-bigG-14.json (text_cfg.heads).
OPENCLIP_HEADS = {"ViT-H-14": 16, "ViT-bigG-14": 20}


def meta_state_dict(module_cls, cfg, prefix: str = "") -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {prefix + k: v for k, v in module_cls(cfg).state_dict().items()}


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def reference_unet_from_yaml(unet_params: dict, checkpoint: dict) -> UNet2DConditionModel:
    """diffusers' UNet configured from the published yaml, strictly loaded with our converted weights."""
    original = {"model": {"params": {"unet_config": {"params": unet_params}}}}
    original["model"]["params"]["first_stage_config"] = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)  # raises on any key or shape mismatch
    return model


def head_counts(ours: UNetModel, ref: UNet2DConditionModel) -> tuple[list[int], list[int]]:
    from diffusers.models.attention_processor import Attention

    mine = sorted(m.heads for m in ours.modules() if isinstance(m, CrossAttention))
    theirs = sorted(m.heads for m in ref.modules() if isinstance(m, Attention))
    return mine, theirs


@pytest.mark.parametrize("in_channels", [4, 9])  # 2.x base / 768-v, and 2.x inpainting
def test_sd2_unet_layout_matches_the_published_config(in_channels):
    from dataclasses import replace

    cfg = replace(SD2_UNET, in_channels=in_channels)
    sd = meta_state_dict(UNetModel, cfg, UNET_PREFIX)
    ref = reference_unet_from_yaml({**SD2_YAML, "in_channels": in_channels}, sd)
    assert numel(sd.values()) == numel(ref.parameters())
    with torch.device("meta"):
        mine, theirs = head_counts(UNetModel(cfg), ref)
    assert mine == theirs


def test_sdxl_unet_layout_matches_the_published_config():
    sd = meta_state_dict(UNetModel, SDXL_UNET, UNET_PREFIX)
    ref = reference_unet_from_yaml(SDXL_YAML, sd)
    assert ref.config.addition_embed_type == "text_time"
    assert numel(sd.values()) == numel(ref.parameters())
    with torch.device("meta"):
        mine, theirs = head_counts(UNetModel(SDXL_UNET), ref)
    assert mine == theirs


def test_sd2_openclip_layout_matches_reference_conversion():
    sd = meta_state_dict(OpenClipTextModel, OPENCLIP_H)
    ref, ignored = reference_open_clip(sd, OPENCLIP_H, SD2_TEXT, device="meta")
    # diffusers drops exactly the unused last block and the projection, by these names.
    assert ignored == set(sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    assert ref.config.num_hidden_layers == OPENCLIP_H.layers - 1
    kept = numel(v for k, v in sd.items() if SD2_TEXT + k not in ignored)
    assert kept == numel(ref.parameters())
    assert OPENCLIP_H.heads == OPENCLIP_HEADS["ViT-H-14"]


def test_sdxl_text_encoder_layouts_match_reference_conversion():
    sd = meta_state_dict(ClipTextModel, CLIP_L)
    ref = reference_clip_sdxl(sd, CLIP_L, device="meta")
    assert numel(sd.values()) == numel(ref.parameters())
    sd = meta_state_dict(OpenClipTextModel, OPENCLIP_BIGG)
    ref, ignored = reference_open_clip(sd, OPENCLIP_BIGG, SDXL_BIGG, device="meta")
    assert not ignored
    assert numel(sd.values()) == numel(ref.parameters())
    assert ref.text_projection.weight.shape == (OPENCLIP_BIGG.projection_dim, OPENCLIP_BIGG.width)
    assert OPENCLIP_BIGG.heads == OPENCLIP_HEADS["ViT-bigG-14"]
    # SDXL's context is both towers' penultimate states side by side, its y the pooled output and six sizes.
    assert CLIP_L.hidden_size + OPENCLIP_BIGG.width == SDXL_UNET.context_dim
    assert OPENCLIP_BIGG.projection_dim + 6 * 256 == SDXL_UNET.adm_in_channels


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (((UNET_PREFIX, UNetModel, SD2_UNET), (SD2_TEXT, OpenClipTextModel, OPENCLIP_H)), "v2"),
        (
            (
                (UNET_PREFIX, UNetModel, SDXL_UNET),
                (SDXL_CLIP_L, ClipTextModel, CLIP_L),
                (SDXL_BIGG, OpenClipTextModel, OPENCLIP_BIGG),
            ),
            "xl_base",
        ),
    ],
)
def test_diffusers_recognises_the_whole_file(parts, expected):
    checkpoint = meta_state_dict(AutoencoderKL, VAEConfig(), "first_stage_model.")
    for prefix, cls, cfg in parts:
        checkpoint.update(meta_state_dict(cls, cfg, prefix))
    assert sfu.infer_diffusers_model_type(checkpoint) == expected
