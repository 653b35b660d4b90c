"""Model families as data: the numbers that shape each network, and detection from a checkpoint's shapes.

A family is what a checkpoint needs to be rebuilt: each component's frozen config (the text encoders as
specs saying where their weights are and how their output feeds the UNet) plus the few numbers the
pipeline uses (latent scale factor, prediction type). Adding a family means adding data here and, only
where the architecture really differs, a module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from sdcli.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per level; 0 means the level has no attention (SD 1.x: the first three levels).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8  # SD 1.x fixes the head count ...
    num_head_channels: int = -1  # ... SD 2.x and SDXL fix the head width instead (64) when this is > 0.
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x+: proj_in/proj_out are Linear, not 1x1 conv.
    norm_groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32


@dataclass(frozen=True)
class ClipConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: where its weights are, its network, and what of it feeds the UNet.

    `layer` is the hidden layer whose output conditions the UNet (-1 the last, -2 the penultimate); a user's
    clip skip of N moves it N - 1 layers further down. `final_norm`: the tower's final layer norm is applied
    to that output. `pooled`: this encoder's pooled output (the final-normed last layer at the end token)
    also conditions the UNet. `pad_id` fills the tokens after the end token; `tokenizer` names the
    tokenizer ("clip": the CLIP BPE, 49408 ids).
    """

    prefix: str
    config: ClipConfig
    layer: int = -1
    final_norm: bool = True
    pooled: bool = False
    pad_id: int = 49407
    tokenizer: str = "clip"

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip that still runs one layer of the tower."""
        return self.config.num_hidden_layers + 1 + self.layer

    def layers_run(self, clip_skip: int) -> int:
        """How many transformer layers run before the output that feeds the UNet is taken."""
        return self.config.num_hidden_layers + 1 + self.layer - (clip_skip - 1)


@dataclass(frozen=True)
class Family:
    name: str
    unet: UNetConfig
    vae: VAEConfig
    # In order; their contexts are concatenated on the feature axis into the UNet's context.
    text_encoders: tuple[TextEncoderSpec, ...]
    scale_factor: float = 0.18215  # latents = VAE mean * scale_factor, applied by the pipeline
    prediction: str = "eps"  # "eps" or "v"
    default_size: int = 512

    @property
    def is_inpainting(self) -> bool:
        # Inpainting UNets take noisy latents, the latent-size mask and the masked image's latents.
        return self.unet.in_channels == self.unet.out_channels * 2 + 1


# OpenAI's CLIP ViT-L/14: the last layer, final-normed, padded with the end token (as A1111 and diffusers).
SD1_CLIP = TextEncoderSpec(CLIP_PREFIX, ClipConfig())
SD1 = Family("sd1", UNetConfig(), VAEConfig(), (SD1_CLIP,))
SD1_INPAINT = replace(SD1, name="sd1-inpaint", unet=replace(SD1.unet, in_channels=9))
# SD 2.x (OpenCLIP ViT-H, v-prediction, linear projections) and SDXL (two text encoders) go here.
FAMILIES = {f.name: f for f in (SD1, SD1_INPAINT)}


def detect(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """Return the family of a checkpoint, with each network's numbers read from the key shapes.

    `shapes` maps full checkpoint keys to tensor shapes (the safetensors header is enough). As ComfyUI
    does, the layout is recognised by marker keys and the sizes are read off the weights, so fine-tunes
    and the tiny test checkpoints load the same way as the originals. Head counts are not visible in
    shapes: SD 1.x uses 8 UNet heads and 64-wide CLIP heads.
    """
    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(
            "no Stable Diffusion UNet found (no key 'model.diffusion_model.input_blocks.0.0.weight'); "
            "is this a single-file checkpoint in the original layout?"
        )
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise CheckpointError("this is an SDXL checkpoint (conditioner.embedders.*): not supported yet")
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        raise CheckpointError("this is an SD 2.x checkpoint (OpenCLIP text encoder): not supported yet")
    if CLIP_PREFIX + "text_model.final_layer_norm.weight" not in shapes:
        raise CheckpointError(
            "unknown checkpoint layout: no text encoder under 'cond_stage_model.transformer.text_model.'; "
            "supported: SD 1.x and SD 1.x inpainting single-file checkpoints"
        )
    unet = _unet_config(shapes)
    base = SD1_INPAINT if unet.in_channels == 9 else SD1
    if unet.in_channels not in (4, 9):
        raise CheckpointError(
            f"unknown SD 1.x variant: the UNet's first convolution takes {unet.in_channels} channels "
            "(expected 4, or 9 for inpainting)"
        )
    encoders = tuple(replace(spec, config=_clip_config(shapes, spec.prefix)) for spec in base.text_encoders)
    return replace(base, unet=unet, vae=_vae_config(shapes), text_encoders=encoders)


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    """Number of distinct indices `{i}` for which some key matches `pattern` (a regex with one group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _unet_config(shapes: Mapping[str, tuple[int, ...]]) -> UNetConfig:
    p = re.escape(UNET_PREFIX)
    first = shapes[UNET_PREFIX + "input_blocks.0.0.weight"]
    model_channels, in_channels = first[0], first[1]
    n_input_blocks = _count(shapes, p + r"input_blocks\.(\d+)\.")
    n_levels = _count(shapes, p + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_res_blocks = (n_input_blocks - 1) // n_levels
    mult, depth = [], []
    for level in range(n_levels):
        block = 1 + level * (num_res_blocks + 1)  # first res block of the level
        mult.append(shapes[f"{UNET_PREFIX}input_blocks.{block}.0.out_layers.3.weight"][0] // model_channels)
        depth.append(_count(shapes, p + rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\."))
    to_k = next(v for k, v in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"))
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shapes[UNET_PREFIX + "out.2.weight"][0],
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depth),
        transformer_depth_middle=_count(shapes, p + r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=to_k[1],
        use_linear_in_transformer=len(proj_in) == 2,
    )


def _vae_config(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    p = re.escape(VAE_PREFIX)
    conv_in = shapes[VAE_PREFIX + "encoder.conv_in.weight"]
    ch = conv_in[0]
    n_levels = _count(shapes, p + r"encoder\.down\.(\d+)\.")
    mult = tuple(shapes[f"{VAE_PREFIX}encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels))
    return VAEConfig(
        in_channels=conv_in[1],
        out_ch=shapes[VAE_PREFIX + "decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=_count(shapes, p + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=shapes[VAE_PREFIX + "decoder.conv_in.weight"][1],
        embed_dim=shapes[VAE_PREFIX + "post_quant_conv.weight"][1],
    )


def _clip_config(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> ClipConfig:
    p = prefix + "text_model."
    vocab_size, hidden = shapes[p + "embeddings.token_embedding.weight"]
    return ClipConfig(
        vocab_size=vocab_size,
        max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
        hidden_size=hidden,
        intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64),  # every CLIP text tower uses 64-wide heads
    )
