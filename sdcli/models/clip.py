"""The CLIP text tower (OpenAI ViT-L/14 for SD 1.x and SDXL's first encoder), with the checkpoint's names.

Attribute paths equal the keys under `cond_stage_model.transformer.` (SD 1.x) or
`conditioner.embedders.0.transformer.` (SDXL): `text_model.encoder.layers.0...`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models.configs import ClipConfig
from sdcli.models.layers import attention, run_blocks

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
    "gelu": F.gelu,
}


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal: each token sees only those before it, as CLIP was trained.
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class ClipMlp(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.self_attn = ClipAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMlp(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]  # (B, T, D)


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ClipTextTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ClipTextModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = ClipTextTransformer(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, T) -> per-token embeddings (B, T, D) for the UNet's cross-attention.

        `clip_skip` has AUTOMATIC1111's meaning: 1 takes the last layer, 2 the one before it; the final
        layer norm is applied in every case.
        """
        layers = self.text_model.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        return self.encode(ids, layer=-clip_skip)[0]

    def encode(
        self, ids: torch.Tensor, layer: int = -1, final_norm: bool = True, pooled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T) -> (per-token states (B, T, D) of `layer`, pooled (B, D) or None).

        The same contract as OpenClipTextModel.encode: `layer` counts from the end as Hugging Face's
        `hidden_states[layer]` (-1: the last layer, as `clip_skip` 1); `final_norm` applies the final layer
        norm to those states (SDXL's CLIP-L does not); `pooled` also returns the last layer's normed state
        at each sequence's end token (its largest id), as transformers' `pooler_output`.
        """
        layers = self.text_model.encoder.layers
        x = self.text_model.embeddings(ids)  # (B, T, D)
        hidden, x = run_blocks(x, layers, layer, to_the_end=pooled)
        if final_norm:
            hidden = self.text_model.final_layer_norm(hidden)
        if not pooled:
            return hidden, None
        end = ids.argmax(dim=-1)  # the end token has the largest id; any padding follows it
        return hidden, self.text_model.final_layer_norm(x)[torch.arange(ids.shape[0], device=ids.device), end]
