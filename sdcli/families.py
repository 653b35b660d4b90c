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
from sdcli.models.configs import (
    OPENCLIP_BIGG,
    OPENCLIP_H,
    SD2_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
    ClipConfig,
    OpenClipConfig,
    UNetConfig,
    VAEConfig,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x's OpenCLIP ViT-H
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner has bigG alone


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
    config: ClipConfig | OpenClipConfig
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
    # No negative prompt given: the unconditional branch gets zero embeddings instead of encoding "" (SDXL,
    # as Stability's sampling code and diffusers' `force_zeros_for_empty_prompt`; A1111 encodes "").
    zero_missing_negative: bool = False
    # The VAE overflows in fp16 (SDXL's): it runs in bf16, or fp32 where bf16 is not supported.
    vae_fp16_overflows: bool = False
    # The label embedding takes an aesthetic score where SDXL base takes the target size (the refiner's).
    aesthetic_score: bool = False

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip every text encoder can honour."""
        return min(spec.max_clip_skip for spec in self.text_encoders)

    @property
    def is_inpainting(self) -> bool:
        # Inpainting UNets take noisy latents, the latent-size mask and the masked image's latents.
        return self.unet.in_channels == self.unet.out_channels * 2 + 1


# OpenAI's CLIP ViT-L/14: the last layer, final-normed, padded with the end token (as A1111 and diffusers).
SD1_CLIP = TextEncoderSpec(CLIP_PREFIX, ClipConfig())
SD1 = Family("sd1", UNetConfig(), VAEConfig(), (SD1_CLIP,))
SD1_INPAINT = replace(SD1, name="sd1-inpaint", unet=replace(SD1.unet, in_channels=9))
# SD 2.x: OpenCLIP ViT-H's penultimate layer followed by ln_final, padded with 0 as open_clip's tokenizer
# does. The 512 base and the 768 v model have the same shapes: `sdcli.prediction` tells them apart.
SD2_CLIP = TextEncoderSpec(OPENCLIP_PREFIX, OPENCLIP_H, layer=-2, final_norm=True, pad_id=0)
SD2 = Family("sd2", SD2_UNET, VAEConfig(), (SD2_CLIP,))
SD2_V = replace(SD2, name="sd2-v", prediction="v", default_size=768)
SD2_INPAINT = replace(SD2, name="sd2-inpaint", unet=replace(SD2_UNET, in_channels=9))
# SDXL: both towers' penultimate layers without final norm, side by side (768 + 1280 = 2048 wide); bigG's
# pooled output (final-normed last layer at the end token, projected) feeds the UNet's label embedding.
SDXL_CLIP_L = TextEncoderSpec(SDXL_CLIP_L_PREFIX, ClipConfig(), layer=-2, final_norm=False)
SDXL_BIGG = TextEncoderSpec(SDXL_BIGG_PREFIX, OPENCLIP_BIGG, layer=-2, final_norm=False, pooled=True, pad_id=0)
SDXL = Family(
    "sdxl", SDXL_UNET, VAEConfig(), (SDXL_CLIP_L, SDXL_BIGG), scale_factor=0.13025, default_size=1024,
    zero_missing_negative=True, vae_fp16_overflows=True,
)  # fmt: skip
# SDXL inpainting (e.g. sd_xl_base_1.0_inpainting_0.1): the base model's networks with a 9-channel UNet.
SDXL_INPAINT = replace(SDXL, name="sdxl-inpaint", unet=replace(SDXL_UNET, in_channels=9))
# The SDXL refiner: bigG alone (as in the base), conditioned on original size, crop and an aesthetic score. It
# encodes a missing negative prompt as "" (Stability's refiner sampling and diffusers' refiner config).
SDXL_REFINER_BIGG = replace(SDXL_BIGG, prefix=SDXL_REFINER_BIGG_PREFIX)
SDXL_REFINER = replace(
    SDXL, name="sdxl-refiner", unet=SDXL_REFINER_UNET, text_encoders=(SDXL_REFINER_BIGG,),
    zero_missing_negative=False, aesthetic_score=True,
)  # fmt: skip
FAMILIES = {f.name: f for f in (SD1, SD1_INPAINT, SD2, SD2_V, SD2_INPAINT, SDXL, SDXL_INPAINT, SDXL_REFINER)}


@dataclass(frozen=True)
class TowerShape:
    """A text encoder found in the header: its prefix, kind ("clip": Hugging Face names; "open_clip": the
    OpenCLIP names of SD 2.x and SDXL's second tower), width and number of layers."""

    prefix: str
    kind: str
    width: int
    depth: int


@dataclass(frozen=True)
class Measured:
    """What a checkpoint's header shows, before any family is chosen (detection's first step)."""

    unet_in_channels: int
    unet_out_channels: int
    model_channels: int
    context_dim: int  # width of the cross-attention keys' input
    adm_in_channels: int | None  # the label embedding's input width (SDXL: 2816); None without one
    linear_proj: bool  # transformer proj_in/proj_out are Linear (SD 2.x, SDXL), not 1x1 convolutions
    text_encoders: tuple[TowerShape, ...]  # in key order of their prefixes

    def describe(self) -> str:
        towers = ", ".join(f"{t.prefix}* ({t.kind}, {t.width} wide, {t.depth} layers)" for t in self.text_encoders)
        label = f", a {self.adm_in_channels}-wide label embedding" if self.adm_in_channels else ""
        return (
            f"a UNet taking {self.unet_in_channels} channels with {self.context_dim}-wide context{label}; "
            f"text encoders: {towers or 'none'}"
        )


@dataclass(frozen=True)
class Signature:
    """What a family's header looks like: its text encoders' prefixes in order, the UNet's input channels,
    whether the UNet has a label embedding."""

    text_encoders: tuple[str, ...]
    in_channels: int
    label_emb: bool = False

    @staticmethod
    def of(measured: Measured) -> Signature:
        prefixes = tuple(t.prefix for t in measured.text_encoders)
        return Signature(prefixes, measured.unet_in_channels, measured.adm_in_channels is not None)


# Detection's second step: the family whose signature the header shows. SD 2.x is eps or v with the same
# shapes: the prediction type is decided after detection (`sdcli.prediction`).
FAMILY_TABLE: dict[Signature, Family] = {
    Signature((CLIP_PREFIX,), 4): SD1,
    Signature((CLIP_PREFIX,), 9): SD1_INPAINT,
    Signature((OPENCLIP_PREFIX,), 4): SD2,
    Signature((OPENCLIP_PREFIX,), 9): SD2_INPAINT,
    Signature((SDXL_CLIP_L_PREFIX, SDXL_BIGG_PREFIX), 4, label_emb=True): SDXL,
    Signature((SDXL_CLIP_L_PREFIX, SDXL_BIGG_PREFIX), 9, label_emb=True): SDXL_INPAINT,
    Signature((SDXL_REFINER_BIGG_PREFIX,), 4, label_emb=True): SDXL_REFINER,
}
# Layouts recognised but not loadable: (text encoder prefixes, what to call them and what to do).
NOT_YET_SUPPORTED = (
    (
        (SDXL_CLIP_L_PREFIX, SDXL_BIGG_PREFIX),
        "an SDXL checkpoint of a kind sdcli does not load: it loads SDXL base models, their fine-tunes and "
        "9-channel inpainting models",
    ),
)
# Where text encoders sit in the known layouts, and the key that marks each kind of tower.
TEXT_ENCODER_PREFIXES = (
    "cond_stage_model.transformer.",
    "cond_stage_model.model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.0.model.",
    "conditioner.embedders.1.model.",
)
TOWER_MARKERS = {"clip": "text_model.final_layer_norm.weight", "open_clip": "ln_final.weight"}


def detect(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """Return the family of a checkpoint, with each network's numbers read from the key shapes.

    `shapes` maps full checkpoint keys to tensor shapes (the safetensors header is enough). As ComfyUI
    does, in two steps: `measure` reads what the shapes show, then the family table is matched by
    signature; the sizes are read off the weights, so fine-tunes and the tiny test checkpoints load the
    same way as the originals. What shapes cannot show (head counts or widths, the prediction type) comes
    from the family. A missing or wrong-shaped tensor among those read is a CheckpointError.
    """
    measured = measure(shapes)
    base = match(measured)
    encoders = tuple(replace(spec, config=_tower_config(shapes, spec)) for spec in base.text_encoders)
    return replace(base, unet=_unet_config(shapes, base.unet), vae=_vae_config(shapes), text_encoders=encoders)


def measure(shapes: Mapping[str, tuple[int, ...]]) -> Measured:
    """Detection's first step: the numbers that tell families apart, read from the header's shapes."""
    first_conv = UNET_PREFIX + "input_blocks.0.0.weight"
    if first_conv not in shapes:
        raise CheckpointError(
            f"no Stable Diffusion UNet found (no key '{first_conv}'); "
            "is this a single-file checkpoint in the original layout?"
        )
    model_channels, in_channels, _, _ = _dims(shapes, first_conv, 4)
    label = UNET_PREFIX + "label_emb.0.0.weight"
    return Measured(
        unet_in_channels=in_channels,
        unet_out_channels=_dims(shapes, UNET_PREFIX + "out.2.weight", 4)[0],
        model_channels=model_channels,
        context_dim=_dims(shapes, _first_key(shapes, UNET_PREFIX, "attn2.to_k.weight"), 2)[1],
        adm_in_channels=_dims(shapes, label, 2)[1] if label in shapes else None,
        linear_proj=len(shapes[_first_key(shapes, UNET_PREFIX, ".proj_in.weight")]) == 2,
        text_encoders=tuple(tower for prefix in TEXT_ENCODER_PREFIXES if (tower := _tower(shapes, prefix))),
    )


def match(measured: Measured) -> Family:
    """Detection's second step: the family in the table whose signature `measured` shows, or a one-line
    error that says what was found."""
    signature = Signature.of(measured)
    if family := FAMILY_TABLE.get(signature):
        return family
    for prefixes, what in NOT_YET_SUPPORTED:
        if signature.text_encoders == prefixes:
            raise CheckpointError(f"this is {what}")
    known = ", ".join(f.name for f in FAMILY_TABLE.values())
    raise CheckpointError(f"unknown checkpoint layout: found {measured.describe()}; sdcli loads: {known}")


def _tower(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> TowerShape | None:
    """The text encoder under `prefix`, if the header holds one."""
    if not any(k.startswith(prefix) for k in shapes):
        return None
    p = re.escape(prefix)
    if prefix + TOWER_MARKERS["clip"] in shapes:
        width = _dims(shapes, prefix + "text_model.embeddings.token_embedding.weight", 2)[1]
        return TowerShape(prefix, "clip", width, _count(shapes, p + r"text_model\.encoder\.layers\.(\d+)\."))
    if prefix + TOWER_MARKERS["open_clip"] in shapes:
        width = _dims(shapes, prefix + "token_embedding.weight", 2)[1]
        return TowerShape(prefix, "open_clip", width, _count(shapes, p + r"transformer\.resblocks\.(\d+)\."))
    return TowerShape(prefix, "unknown", 0, 0)


def _dims(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of `key`, which must be there with `ndim` positive dimensions."""
    shape = shapes.get(key)
    if shape is None:
        raise CheckpointError(f"no tensor '{key}': the file is damaged or not a complete Stable Diffusion checkpoint")
    if len(shape) != ndim or not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointError(
            f"tensor '{key}' has shape {list(shape)}, expected {ndim} nonzero dimensions: the file is damaged"
        )
    return tuple(shape)


def _first_key(shapes: Mapping[str, tuple[int, ...]], prefix: str, suffix: str) -> str:
    """The first key under `prefix` that ends with `suffix`."""
    key = next((k for k in shapes if k.startswith(prefix) and k.endswith(suffix)), None)
    if key is None:
        raise CheckpointError(
            f"no tensor '{prefix}*{suffix}': the file is damaged or not a Stable Diffusion checkpoint"
        )
    return key


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    """Number of distinct indices `{i}` for which some key matches `pattern` (a regex with one group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _unet_config(shapes: Mapping[str, tuple[int, ...]], base: UNetConfig) -> UNetConfig:
    """`base` (the family's UNet: head counts) with the sizes the shapes show."""
    p = re.escape(UNET_PREFIX)
    model_channels, in_channels, _, _ = _dims(shapes, UNET_PREFIX + "input_blocks.0.0.weight", 4)
    n_input_blocks = _count(shapes, p + r"input_blocks\.(\d+)\.")
    n_levels = _count(shapes, p + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_res_blocks = (n_input_blocks - 1) // n_levels
    mult, depth = [], []
    for level in range(n_levels):
        block = 1 + level * (num_res_blocks + 1)  # first res block of the level
        mult.append(_dims(shapes, f"{UNET_PREFIX}input_blocks.{block}.0.out_layers.3.weight", 4)[0] // model_channels)
        depth.append(_count(shapes, p + rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\."))
    proj_in = shapes[_first_key(shapes, UNET_PREFIX, ".proj_in.weight")]
    label = UNET_PREFIX + "label_emb.0.0.weight"
    return replace(
        base,
        in_channels=in_channels,
        out_channels=_dims(shapes, UNET_PREFIX + "out.2.weight", 4)[0],
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depth),
        transformer_depth_middle=_count(shapes, p + r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=_dims(shapes, _first_key(shapes, UNET_PREFIX, "attn2.to_k.weight"), 2)[1],
        use_linear_in_transformer=len(proj_in) == 2,
        adm_in_channels=_dims(shapes, label, 2)[1] if label in shapes else 0,
    )


def _vae_config(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    p = re.escape(VAE_PREFIX)
    ch, in_channels, _, _ = _dims(shapes, VAE_PREFIX + "encoder.conv_in.weight", 4)
    n_levels = _count(shapes, p + r"encoder\.down\.(\d+)\.")
    mult = tuple(
        _dims(shapes, f"{VAE_PREFIX}encoder.down.{i}.block.0.conv2.weight", 4)[0] // ch for i in range(n_levels)
    )
    return VAEConfig(
        in_channels=in_channels,
        out_ch=_dims(shapes, VAE_PREFIX + "decoder.conv_out.weight", 4)[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=_count(shapes, p + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=_dims(shapes, VAE_PREFIX + "decoder.conv_in.weight", 4)[1],
        embed_dim=_dims(shapes, VAE_PREFIX + "post_quant_conv.weight", 4)[1],
    )


def _tower_config(shapes: Mapping[str, tuple[int, ...]], spec: TextEncoderSpec) -> ClipConfig | OpenClipConfig:
    """`spec`'s tower config with the sizes the shapes show."""
    if isinstance(spec.config, OpenClipConfig):
        return _open_clip_config(shapes, spec.prefix, spec.config)
    return _clip_config(shapes, spec.prefix)


def _open_clip_config(shapes: Mapping[str, tuple[int, ...]], prefix: str, base: OpenClipConfig) -> OpenClipConfig:
    vocab_size, width = _dims(shapes, prefix + "token_embedding.weight", 2)
    return replace(
        base,
        vocab_size=vocab_size,
        context_length=_dims(shapes, prefix + "positional_embedding", 2)[0],
        width=width,
        layers=_count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."),
        heads=max(1, width // 64),  # ViT-H and bigG both use 64-wide heads
        mlp_width=_dims(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight", 2)[0],
        projection_dim=_dims(shapes, prefix + "text_projection", 2)[1],
    )


def with_prediction(family: Family, prediction: str) -> Family:
    """`family` predicting `prediction` ("eps" or "v"); SD 2.x's two text-to-image models have names of their own."""
    if family.name in (SD2.name, SD2_V.name):
        variant = SD2_V if prediction == "v" else SD2
        return replace(family, name=variant.name, prediction=prediction, default_size=variant.default_size)
    return replace(family, prediction=prediction)


def _clip_config(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> ClipConfig:
    p = prefix + "text_model."
    vocab_size, hidden = _dims(shapes, p + "embeddings.token_embedding.weight", 2)
    return ClipConfig(
        vocab_size=vocab_size,
        max_position_embeddings=_dims(shapes, p + "embeddings.position_embedding.weight", 2)[0],
        hidden_size=hidden,
        intermediate_size=_dims(shapes, p + "encoder.layers.0.mlp.fc1.weight", 2)[0],
        num_hidden_layers=_count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64),  # every CLIP text tower uses 64-wide heads
    )
