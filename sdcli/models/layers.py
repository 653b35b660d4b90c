"""Building blocks shared by the networks: normalisation, attention and the timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype, as the original LDM code has it.

    Half-precision statistics over large feature maps lose too much. PyTorch's CPU and CUDA kernels already
    accumulate half-precision input in float32 (results within an ulp of casting to fp32 and back), without
    the two fp32 copies of the feature map that casting costs; elsewhere (MPS) we cast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.device.type in ("cpu", "cuda"):
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention over (B, N, C) projections with scaled_dot_product_attention.

    No upcast in half precision, where diffusers upcasts SD 2.1's attention (`upcast_attention`): that guards
    the naive q.k^T, which can pass fp16's 65504 before the scale brings it down. PyTorch's CPU and CUDA kernels
    accumulate the product in fp32 and scale it there (the CUDA math fallback upcasts half input, or scales
    q and k first), so its size never meets fp16's range. MPS's MPSGraph fallback multiplies in fp16 before
    scaling: there q is scaled first (`_scale_q_first`), exactly for 64-wide heads (1/8).
    """
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    scale = None
    if _scale_q_first(q):
        q, scale = q * q.shape[-1] ** -0.5, 1.0
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)


def _scale_q_first(q: torch.Tensor) -> bool:
    """True where SDPA may form the unscaled q.k^T in fp16: half precision on MPS."""
    return q.dtype == torch.float16 and q.device.type == "mps"


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as in LDM's openaimodel: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def run_blocks(
    x: torch.Tensor, blocks: nn.ModuleList, layer: int, to_the_end: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A text tower's blocks on embeddings x -> (hidden state `layer`, the output of the last block run).

    `layer` counts from the end as Hugging Face's `hidden_states[layer]` (-1: the last block's output). Only
    the blocks that state needs run, unless `to_the_end` (a pooled output needs the last block).
    """
    depth = len(blocks)
    if not -depth <= layer <= -1:
        raise ValueError(f"layer must be between {-depth} and -1, got {layer}")
    wanted = depth + 1 + layer  # blocks before hidden state `layer`
    hidden = x
    for i, block in enumerate(blocks[: depth if to_the_end else wanted]):
        x = block(x)
        if i + 1 == wanted:
            hidden = x
    return hidden, x
