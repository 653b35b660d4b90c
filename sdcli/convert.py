"""Other layouts' names converted into ours: diffusers' UNet, VAE and CLIP, and the LoRA files named after them.

Our modules carry the original checkpoint names, so converting a layout is renaming module prefixes.
Each table is built in loops from the network's config (levels, res blocks, attention levels): one
entry per block (`input_blocks.1.0` <-> `down_blocks.0.resnets.0`), plus the few names that differ
inside a ResNet block. Keys are never listed.

kohya-ss LoRA files spell a module as its dotted name with '.' -> '_' after a prefix per network
(`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_mlp_fc1`), using
the diffusers name for SD 1.x and the original name for SDXL (`lora_unet_input_blocks_4_1_proj_in`);
diffusers/PEFT files use the dotted diffusers name after `unet.` or `text_encoder.`. SDXL's two text
encoders are `lora_te1_`/`text_encoder.` and `lora_te2_`/`text_encoder_2.`. Text encoders are always
named as transformers' CLIP, OpenCLIP towers (SD 2.x, SDXL's second) included: their fused q/k/v input
projection is three LoRA modules, each changing one block of rows. `lora_aliases` lists every spelling
of every weight of a checkpoint, so resolving a LoRA's module is one lookup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from sdcli.families import UNET_PREFIX, Family, OpenClipConfig, UNetConfig, VAEConfig

if TYPE_CHECKING:
    from torch import Tensor

# Inside a UNet ResBlock: our name -> diffusers' ResnetBlock2D name.
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Inside a VAE ResnetBlock and the VAE's mid-block attention. diffusers' attention projections are
# Linear (C, C) where ours are 1x1 convolutions (C, C, 1, 1): same numbers, a reshape apart.
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Inside an OpenCLIP residual block: our name -> transformers' CLIPEncoderLayer name. The attention's fused
# input projection `attn.in_proj_weight` is transformers' q_proj, k_proj and v_proj stacked (FUSED_PROJECTIONS).
OPENCLIP_BLOCK = {"attn": "self_attn", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# A fused weight (our parameter name) -> the modules whose weights it stacks row-wise, in order.
FUSED_PROJECTIONS = {"in_proj_weight": ("q_proj", "k_proj", "v_proj")}


@dataclass(frozen=True)
class NameTable:
    """Module-prefix pairs (ours, diffusers'), each with the renames inside that block (None: same names)."""

    blocks: tuple[tuple[str, str, Mapping[str, str] | None], ...]
    _ours: dict = field(init=False, repr=False, compare=False)
    _theirs: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ours", {o: (t, inner) for o, t, inner in self.blocks})
        object.__setattr__(self, "_theirs", {t: (o, _inverse(inner)) for o, t, inner in self.blocks})

    def to_diffusers(self, name: str) -> str | None:
        """diffusers' name for one of our parameter or module names (without the checkpoint prefix); None if none."""
        return _rename(name, self._ours)

    def from_diffusers(self, name: str) -> str | None:
        """Our name for one of diffusers' parameter or module names; None if it names nothing we have."""
        return _rename(name, self._theirs)


def _inverse(inner: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if inner is None else {v: k for k, v in inner.items()}


def _split_at_prefix(name: str, prefixes: Mapping[str, object]) -> tuple[str, str] | None:
    """(prefix, rest) for the longest dotted prefix of `name` found in `prefixes`; rest is '' or starts with '.'."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in prefixes:
            return prefix, name[len(prefix) :]
    return None


def _rename(name: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    found = _split_at_prefix(name, table)
    if found is None:
        return None
    prefix, rest = found
    target, inner = table[prefix]
    if inner is None or not rest:
        return target + rest
    found = _split_at_prefix(rest[1:], inner)
    if found is None:
        return None
    inner_prefix, inner_rest = found
    return f"{target}.{inner[inner_prefix]}{inner_rest}"


def unet_table(cfg: UNetConfig) -> NameTable:
    """Our UNet (LDM `openaimodel`) names <-> diffusers' UNet2DConditionModel names, from the config."""
    blocks: list[tuple[str, str, Mapping[str, str] | None]] = [
        ("time_embed.0", "time_embedding.linear_1", None),
        ("time_embed.2", "time_embedding.linear_2", None),
        ("input_blocks.0.0", "conv_in", None),
        ("out.0", "conv_norm_out", None),
        ("out.2", "conv_out", None),
    ]
    if cfg.adm_in_channels:  # SDXL's label embedding of the size/pooled vector: diffusers' "text_time" embedding
        blocks += [("label_emb.0.0", "add_embedding.linear_1", None), ("label_emb.0.2", "add_embedding.linear_2", None)]
    levels = len(cfg.channel_mult)
    per_level = cfg.num_res_blocks + 1  # res blocks, then a downsampler (input side) or one more res block (output)
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            n = 1 + level * per_level + j
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if cfg.transformer_depth[level]:
                blocks.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", None))
        if level < levels - 1:
            n = 1 + level * per_level + cfg.num_res_blocks
            blocks.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", None))
    blocks += [
        ("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
    ]
    for up, level in enumerate(reversed(range(levels))):
        attention = bool(cfg.transformer_depth[level])
        for j in range(per_level):
            n = up * per_level + j
            blocks.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESNET))
            if attention:
                blocks.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", None))
            if level > 0 and j == cfg.num_res_blocks:
                blocks.append((f"output_blocks.{n}.{1 + attention}.conv", f"up_blocks.{up}.upsamplers.0.conv", None))
    return NameTable(tuple(blocks))


def vae_table(cfg: VAEConfig) -> NameTable:
    """Our VAE (LDM `autoencoder`) names <-> diffusers' AutoencoderKL names, from the config."""
    blocks: list[tuple[str, str, Mapping[str, str] | None]] = [
        ("quant_conv", "quant_conv", None),
        ("post_quant_conv", "post_quant_conv", None),
    ]
    levels = len(cfg.ch_mult)
    for side in ("encoder", "decoder"):
        blocks += [
            (f"{side}.conv_in", f"{side}.conv_in", None),
            (f"{side}.conv_out", f"{side}.conv_out", None),
            (f"{side}.norm_out", f"{side}.conv_norm_out", None),
            (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET),
            (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION),
            (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET),
        ]
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET))
        if level < levels - 1:
            down = f"encoder.down_blocks.{level}.downsamplers.0.conv"
            blocks.append((f"encoder.down.{level}.downsample.conv", down, None))
    for up, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET))
        if level > 0:
            blocks.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", None))
    return NameTable(tuple(blocks))


def clip_table() -> NameTable:
    """Our CLIP text tower names <-> transformers' CLIPTextModel names: the same (`text_model.` first)."""
    return NameTable((("text_model", "text_model", None),))


def open_clip_table(layers: int) -> NameTable:
    """Our OpenCLIP text tower names <-> transformers' CLIPTextModel names, per residual block.

    Only the blocks' projections are mapped (what LoRA files adapt); a fused `attn.in_proj_weight` maps to the
    attention module, `self_attn`, whose q/k/v projections it stacks (FUSED_PROJECTIONS).
    """
    return NameTable(
        tuple((f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPENCLIP_BLOCK) for i in range(layers))
    )


@dataclass(frozen=True)
class LoraTarget:
    """One network of a family as LoRA files name it."""

    network: str  # "unet" or "te": which of a LoRA's two weights applies to it
    prefix: str  # the network's prefix in the checkpoint
    kohya_prefixes: tuple[str, ...]  # kohya-ss: prefix + name with '.' -> '_'
    diffusers_prefixes: tuple[str, ...]  # diffusers/PEFT: prefix + dotted diffusers name
    table: NameTable


class LoraSite(NamedTuple):
    """Where a LoRA module's change goes: a checkpoint weight, or one block of its rows."""

    target: LoraTarget
    key: str  # the checkpoint key of the weight
    rows: tuple[int, int] | None = None  # (i, n): the i-th of n equal blocks of rows (q, k or v of a fused weight)


def lora_targets(family: Family) -> tuple[LoraTarget, ...]:
    """The networks a LoRA may adapt in `family`, with their LoRA-file prefixes.

    One text encoder is `lora_te_`/`text_encoder.`; with two (SDXL) they are `lora_te1_`/`text_encoder.`
    (also `lora_te_`, as diffusers reads it) and `lora_te2_`/`text_encoder_2.`.
    """
    # The oldest diffusers files name UNet modules without a prefix.
    targets = [LoraTarget("unet", UNET_PREFIX, ("lora_unet_",), ("unet.", ""), unet_table(family.unet))]
    several = len(family.text_encoders) > 1
    for i, spec in enumerate(family.text_encoders):
        kohya = (f"lora_te{i + 1}_",) if several else ()
        if i == 0:
            kohya += ("lora_te_",)
        diffusers = "text_encoder." if i == 0 else f"text_encoder_{i + 1}."
        is_open_clip = isinstance(spec.config, OpenClipConfig)
        table = open_clip_table(spec.config.layers) if is_open_clip else clip_table()
        targets.append(LoraTarget("te", spec.prefix, kohya, (diffusers,), table))
    return tuple(targets)


def _lora_modules(target: LoraTarget, ours: str) -> list[tuple[str, tuple[int, int] | None]]:
    """The diffusers/transformers module names a LoRA may give our parameter `ours` (no network prefix), each
    with the rows it changes: one module for a `.weight`, one per block of a fused weight."""
    if ours.endswith(".weight"):
        theirs = target.table.to_diffusers(ours.removesuffix(".weight"))
        return [] if theirs is None else [(theirs, None)]
    module, _, parameter = ours.rpartition(".")
    stacked = FUSED_PROJECTIONS.get(parameter, ())
    theirs = target.table.to_diffusers(module) if stacked else None
    if theirs is None:
        return []
    return [(f"{theirs}.{name}", (i, len(stacked))) for i, name in enumerate(stacked)]


def lora_aliases(targets: Iterable[LoraTarget], keys: Iterable[str]) -> dict[str, LoraSite]:
    """Every name a LoRA file may give a module -> where its change goes (network, checkpoint key, rows).

    `keys` are the checkpoint's keys (those of no weight a LoRA adapts are skipped). Each module gets its
    kohya spelling from its diffusers name and, where it is a whole weight, from the original name (SDXL's
    kohya files), and its dotted diffusers name; transformers' CLIP names are accepted with and without the
    leading `text_model.`.
    """
    aliases: dict[str, LoraSite] = {}
    targets = tuple(targets)
    for key in keys:
        target = next((t for t in targets if key.startswith(t.prefix)), None)
        if target is None:
            continue
        ours = key[len(target.prefix) :]
        for theirs, rows in _lora_modules(target, ours):
            site = LoraSite(target, key, rows)
            names = (theirs,) if rows else (ours.removesuffix(".weight"), theirs)
            for prefix in target.kohya_prefixes:
                for name in names:
                    aliases[prefix + name.replace(".", "_")] = site
            for prefix in target.diffusers_prefixes:
                for name in {theirs, theirs.removeprefix("text_model.")}:
                    aliases[prefix + name] = site
    return aliases


# Attention names in diffusers' VAE files saved before diffusers 0.14.
VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_names_from_diffusers(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Our name for each key of a diffusers-layout VAE (AutoencoderKL), and the keys that map to nothing.

    The level and res-block counts are read from the keys.
    """
    keys = list(keys)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in keys if (m := rx.match(k))})

    levels = count(r"encoder\.down_blocks\.(\d+)\.")
    res_blocks = count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    table = vae_table(VAEConfig(ch_mult=(1,) * levels, num_res_blocks=res_blocks))
    names, unknown = {}, []
    for key in keys:
        modern = key
        parts = key.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in VAE_LEGACY_ATTENTION:
            modern = f"{parts[0]}.{VAE_LEGACY_ATTENTION[parts[1]]}.{parts[2]}"
        ours = table.from_diffusers(modern)
        if ours is None:
            unknown.append(key)
        else:
            names[key] = ours
    return names, unknown


def vae_shape_from_diffusers(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of our tensor `ours` for a diffusers tensor of `shape`: the mid-block attention's Linear
    weights (C, C) are our 1x1 convolutions (C, C, 1, 1), the same numbers."""
    if ".attn_1." in ours and ours.endswith(".weight") and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)


def vae_from_diffusers(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A diffusers-layout VAE state dict (AutoencoderKL) in our names and shapes, and the keys that map to nothing."""
    names, unknown = vae_names_from_diffusers(state_dict)
    converted = {
        ours: state_dict[key].reshape(vae_shape_from_diffusers(ours, tuple(state_dict[key].shape)))
        for key, ours in names.items()
    }
    return converted, unknown
