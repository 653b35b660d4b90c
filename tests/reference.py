"""The reference side of parity tests: diffusers' own single-file conversion and diffusers/transformers models.

Our modules' state dicts (original layout) go through `diffusers.loaders.single_file_utils`, exactly as
diffusers converts a user's checkpoint, and load strictly into the reference models.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from sdcli.families import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, ClipConfig, UNetConfig, VAEConfig


def ldm_original_config(unet: UNetConfig, vae: VAEConfig) -> dict:
    """The parts of an LDM yaml config (v1-inference.yaml shape) that diffusers' converters read."""
    levels = len(unet.channel_mult)
    unet_params = {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": list(unet.channel_mult),
        "num_res_blocks": unet.num_res_blocks,
        "attention_resolutions": [2**i for i in range(levels) if unet.transformer_depth[i]],
        # diffusers gives the middle block the last level's depth; levels without attention ignore theirs.
        "transformer_depth": [d or unet.transformer_depth_middle for d in unet.transformer_depth],
        "context_dim": unet.context_dim,
        "use_linear_in_transformer": unet.use_linear_in_transformer,
    }
    if unet.num_head_channels > 0:
        unet_params["num_head_channels"] = unet.num_head_channels
    else:
        unet_params["num_heads"] = unet.num_heads
    assert unet_params["transformer_depth"][-1] == unet.transformer_depth_middle, "diffusers cannot express this"
    ddconfig = {
        "in_channels": vae.in_channels,
        "out_ch": vae.out_ch,
        "ch": vae.ch,
        "ch_mult": list(vae.ch_mult),
        "num_res_blocks": vae.num_res_blocks,
        "z_channels": vae.z_channels,
    }
    return {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }


def _prefixed(state_dict: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state_dict.items()}


def reference_unet(state_dict: dict, unet: UNetConfig, vae: VAEConfig, device: str = "cpu") -> UNet2DConditionModel:
    """diffusers' UNet holding our UNet's weights (`state_dict` without prefix), loaded strictly."""
    checkpoint = _prefixed(state_dict, UNET_PREFIX)
    config = sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(unet, vae), checkpoint)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device(device):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval()


def reference_vae(state_dict: dict, unet: UNetConfig, vae: VAEConfig, device: str = "cpu") -> AutoencoderKL:
    checkpoint = _prefixed(state_dict, VAE_PREFIX)
    config = sfu.create_vae_diffusers_config_from_ldm(ldm_original_config(unet, vae), checkpoint)
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device(device):
        model = AutoencoderKL(**config)
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval()


def clip_text_config(clip: ClipConfig, **overrides) -> CLIPTextConfig:
    """transformers' config for our ClipConfig."""
    return CLIPTextConfig(
        vocab_size=clip.vocab_size,
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers,
        num_attention_heads=clip.num_attention_heads,
        max_position_embeddings=clip.max_position_embeddings,
        hidden_act=clip.hidden_act,
        layer_norm_eps=clip.layer_norm_eps,
        bos_token_id=0,
        eos_token_id=min(49407, clip.vocab_size - 1),
        pad_token_id=1,
        **overrides,
    )


def reference_clip(state_dict: dict, clip: ClipConfig, device: str = "cpu") -> CLIPTextModel:
    converted = sfu.convert_ldm_clip_checkpoint(_prefixed(state_dict, CLIP_PREFIX))
    # transformers 5 dropped the `text_model.` level and the position_ids buffer from CLIPTextModel.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
    with torch.device(device):
        model = CLIPTextModel(clip_text_config(clip))
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Outputs agree within `rtol` of the reference output's largest magnitude."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} exceeds {rtol} x {scale:.3g}"


def reference_models_from_file(path: str, family) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """diffusers' UNet and VAE and transformers' CLIP text model holding a checkpoint file's weights."""
    from safetensors.torch import load_file

    sd = load_file(path)

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = reference_unet(part(UNET_PREFIX), family.unet, family.vae)
    vae = reference_vae(part(VAE_PREFIX), family.unet, family.vae)
    clip = reference_clip(part(CLIP_PREFIX), family.text_encoders[0].config)
    return unet, vae, clip


def reference_tokenizer():
    """transformers' CLIP tokenizer on the vocabulary files sdcli ships (the same BPE as openai's)."""
    from importlib.resources import files

    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(files("sdcli") / "data"), local_files_only=True, model_max_length=77)


def sd15_ddim_scheduler():
    """diffusers' DDIM with Stable Diffusion 1.5's scheduler settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip


def reference_pipeline(pipeline_class, checkpoint: str, family):
    """A diffusers pipeline (txt2img, img2img or inpaint) on a checkpoint's weights, with SD 1.5's DDIM."""
    unet, vae, clip = reference_models_from_file(checkpoint, family)
    pipe = pipeline_class(
        vae=vae, text_encoder=clip, tokenizer=reference_tokenizer(), unet=unet, scheduler=sd15_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def open_clip_text_config(clip, num_hidden_layers: int | None = None) -> CLIPTextConfig:
    """transformers' config for our OpenClipConfig (pads with 0; its end token is the vocabulary's last id)."""
    return CLIPTextConfig(
        vocab_size=clip.vocab_size,
        hidden_size=clip.width,
        intermediate_size=clip.mlp_width,
        num_hidden_layers=clip.layers if num_hidden_layers is None else num_hidden_layers,
        num_attention_heads=clip.heads,
        max_position_embeddings=clip.context_length,
        hidden_act=clip.hidden_act,
        layer_norm_eps=clip.layer_norm_eps,
        projection_dim=clip.projection_dim,
        bos_token_id=clip.vocab_size - 2,
        eos_token_id=clip.vocab_size - 1,
        pad_token_id=0,
    )


def reference_open_clip(state_dict: dict, clip, prefix: str, device: str = "cpu"):
    """transformers' CLIP text model holding our OpenCLIP tower's weights, converted as diffusers does.

    Under SD 2.x's prefix diffusers builds a CLIPTextModel and drops `text_projection` and, at full size, the
    unused last block (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`); under SDXL's it builds a
    CLIPTextModelWithProjection. Returns the model and the checkpoint keys diffusers deliberately ignores.
    """
    from transformers import CLIPTextModelWithProjection

    checkpoint = _prefixed(state_dict, prefix)
    with_projection = prefix != "cond_stage_model.model."
    with torch.device("meta"):  # the converter only reads the config from the model it is given
        shell = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(open_clip_text_config(clip))
    converted = sfu.convert_open_clip_checkpoint(shell, checkpoint, prefix=prefix)
    if not with_projection:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    layers = len({k.split("encoder.layers.")[1].split(".")[0] for k in converted if "encoder.layers." in k})
    ignored = {k for k in checkpoint if k in sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE}
    with torch.device(device):
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        model = cls(open_clip_text_config(clip, num_hidden_layers=layers))
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval(), ignored


def reference_clip_sdxl(state_dict: dict, clip: ClipConfig, device: str = "cpu") -> CLIPTextModel:
    """transformers' CLIP text model holding our CLIP-L's weights under SDXL's prefix, converted as diffusers does."""
    converted = sfu.convert_ldm_clip_checkpoint(_prefixed(state_dict, "conditioner.embedders.0.transformer."))
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
    with torch.device(device):
        model = CLIPTextModel(clip_text_config(clip))
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval()


def reference_unet_sdxl(state_dict: dict, unet: UNetConfig, device: str = "cpu") -> UNet2DConditionModel:
    """diffusers' SDXL UNet (`addition_embed_type="text_time"`) holding our UNet's weights, loaded strictly.

    diffusers picks "text_time" for `num_classes: sequential` only when the context is 2048 or 1280 wide
    (SDXL base, refiner), so tiny SDXL-shaped configs keep one of those widths.
    """
    checkpoint = _prefixed(state_dict, UNET_PREFIX)
    original = ldm_original_config(unet, VAEConfig())
    original["model"]["params"]["unet_config"]["params"].update(
        num_classes="sequential", adm_in_channels=unet.adm_in_channels
    )
    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    assert config["addition_embed_type"] == "text_time", config["addition_embed_type"]
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device(device):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=device == "meta")
    return model.eval()


def assert_same_image(ours, expected, where=None) -> None:
    """An 8-bit image read as floats in [0, 1] against a reference pipeline's float image (H, W, 3), over the
    pixels `where` (a boolean (H, W) mask) or all: mean absolute difference under 1/255, and at most 1% of the
    values other than the reference rounded to 8 bits.

    The second check is the sharp one. At parity a value rounds differently only where the two images sit
    astride a rounding boundary (under 0.01% of the values in the end-to-end tests); on these tiny random models
    a wrong conditioning input (e.g. another SDXL original size) moves about a fifth of the 8-bit values by one
    level, yet the mean difference stays under 1/255.
    """
    import numpy as np

    ours, expected = np.asarray(ours, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    if where is not None:
        ours, expected = ours[where], expected[where]
    assert np.abs(ours - expected).mean() < 1 / 255
    changed = (np.round(ours * 255) != np.round(expected * 255)).mean()
    assert changed <= 0.01, f"{changed:.2%} of the 8-bit values differ from the reference's"
