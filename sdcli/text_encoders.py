"""A family's text encoders, driven by their specs: build each network, tokenize for it, encode prompts.

Each kind of tower (keyed by its config's type) names its module and how to take the hidden layer and the
pooled output its spec asks for; `combine_outputs` puts the encoders' outputs into one TextConditioning
(contexts concatenated on the feature axis, as SDXL's two towers are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sdcli.conditioning import TextConditioning
from sdcli.errors import UsageError
from sdcli.families import ClipConfig, TextEncoderSpec
from sdcli.models.clip import ClipTextModel
from sdcli.models.configs import OpenClipConfig
from sdcli.models.openclip import OpenClipTextModel

# (module, ids, spec, layers to run) -> (context (B, T, D), pooled (B, P) or None)
EncodeFn = Callable[[nn.Module, torch.Tensor, TextEncoderSpec, int], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class TowerKind:
    build: Callable[[object], nn.Module]
    encode: EncodeFn


def encode_clip(
    module: ClipTextModel, ids: torch.Tensor, spec: TextEncoderSpec, layers: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Hugging Face-layout CLIP tower: the output of its first `layers` layers, normed if the spec says
    so; pooled = the final-normed last layer at each row's end token (the highest id, as CLIP pools)."""
    text_model = module.text_model
    x = text_model.embeddings(ids)  # (B, T, D)
    hidden = x
    for i, layer in enumerate(text_model.encoder.layers[: len(text_model.encoder.layers) if spec.pooled else layers]):
        x = layer(x)
        if i + 1 == layers:
            hidden = x
    context = text_model.final_layer_norm(hidden) if spec.final_norm else hidden
    if not spec.pooled:
        return context, None
    ends = ids.argmax(dim=-1)
    return context, text_model.final_layer_norm(x)[torch.arange(len(ids), device=ids.device), ends]  # (B, D)


def encode_open_clip(
    module: OpenClipTextModel, ids: torch.Tensor, spec: TextEncoderSpec, layers: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The OpenCLIP tower (SD 2.x, SDXL's second): the output of its first `layers` blocks, `ln_final`-ed if
    the spec says so; pooled = OpenCLIP's projected text embedding of the last block."""
    return module.encode(ids, layers - module.cfg.layers - 1, spec.final_norm, spec.pooled)


# One entry per tower architecture; a new text encoder module registers its config type here.
TOWERS: dict[type, TowerKind] = {
    ClipConfig: TowerKind(ClipTextModel, encode_clip),
    OpenClipConfig: TowerKind(OpenClipTextModel, encode_open_clip),
}


def _tower(spec: TextEncoderSpec) -> TowerKind:
    kind = TOWERS.get(type(spec.config))
    if kind is None:
        raise ValueError(f"no text encoder module for {type(spec.config).__name__}")
    return kind


def build_text_encoder(spec: TextEncoderSpec) -> nn.Module:
    """The network for `spec`, with fresh (random or meta) weights."""
    return _tower(spec).build(spec.config)


def make_tokenizer(spec: TextEncoderSpec):
    """The tokenizer that feeds `spec`'s encoder: its kind, context length and pad id."""
    if spec.tokenizer != "clip":
        raise ValueError(f"unknown tokenizer kind {spec.tokenizer!r}")
    from sdcli.tokenizer import ClipTokenizer

    return ClipTokenizer(max_length=spec.config.max_position_embeddings, pad_token_id=spec.pad_id)


def run_text_encoder(
    module: nn.Module, spec: TextEncoderSpec, ids: torch.Tensor, clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (B, T) -> (context (B, T, D), pooled (B, P) or None) as `spec` and `clip_skip` ask.

    `clip_skip` has AUTOMATIC1111's meaning relative to the spec's layer: 1 keeps it, 2 takes the one
    before it, and so on.
    """
    if not 1 <= clip_skip <= spec.max_clip_skip:
        raise UsageError(f"clip skip must be between 1 and {spec.max_clip_skip} for this model, got {clip_skip}")
    return _tower(spec).encode(module, ids, spec, spec.layers_run(clip_skip))


def combine_outputs(outputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> TextConditioning:
    """The family's encoders' (context, pooled) outputs, in order -> one TextConditioning in float32.

    Contexts are concatenated on the feature axis; `pooled` comes from the encoder whose spec has it.
    """
    pooled = [p.float() for _, p in outputs if p is not None]
    return TextConditioning(torch.cat([c.float() for c, _ in outputs], dim=-1), pooled[0] if pooled else None)
