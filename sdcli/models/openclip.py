"""OpenCLIP's text tower (ViT-H/14 for SD 2.x, ViT-bigG/14 for SDXL), with the checkpoint's attribute names.

Attribute paths equal the keys under `cond_stage_model.model.` (SD 2.x) or `conditioner.embedders.1.model.`
(SDXL): `token_embedding`, `positional_embedding`, `transformer.resblocks.N.attn.in_proj_weight`, `ln_final`,
`text_projection`. The files also hold a scalar `logit_scale` (the image-text temperature, unused for
conditioning); it is not a weight of ours, and the loader skips scalars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models.clip import ACTIVATIONS
from sdcli.models.configs import OpenClipConfig
from sdcli.models.layers import attention, run_blocks


class OpenClipAttention(nn.Module):
    """torch's nn.MultiheadAttention as OpenCLIP saves it: one fused (3D, D) input projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, D)
        # Causal, as OpenCLIP's attn_mask: each token sees only those before it.
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class OpenClipMlp(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = OpenClipAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = OpenClipMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenClipTextModel(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = OpenClipTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))  # used as x @ W

    def forward(
        self, ids: torch.Tensor, layer: int = -1, final_norm: bool = True, pooled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See `encode`."""
        return self.encode(ids, layer, final_norm, pooled)

    def encode(
        self, ids: torch.Tensor, layer: int = -1, final_norm: bool = True, pooled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T) -> (per-token states (B, T, D) of `layer`, pooled (B, P) or None).

        `layer` counts from the end as Hugging Face's `hidden_states[layer]`: -1 is the last block's output,
        -2 the one before (SD 2.x and SDXL take -2). `final_norm` applies `ln_final` to those states (SD 2.x
        does, SDXL does not). `pooled` also returns OpenCLIP's text embedding: the last block's output after
        `ln_final`, at each sequence's end token (its largest id), times `text_projection`.
        """
        blocks = self.transformer.resblocks
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]  # (B, T, D)
        hidden, x = run_blocks(x, blocks, layer, to_the_end=pooled)
        if final_norm:
            hidden = self.ln_final(hidden)
        if not pooled:
            return hidden, None
        end = ids.argmax(dim=-1)  # the end token has the largest id; padding (0) follows it
        last = self.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), end]  # (B, D)
        return hidden, last @ self.text_projection  # (B, P)
