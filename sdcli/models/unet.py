"""The latent diffusion UNet (LDM's openaimodel.UNetModel), with the checkpoint's attribute names.

Attribute paths equal the keys under `model.diffusion_model.` so a checkpoint loads with prefix
stripping only. `nn.Sequential` indices that hold activations or dropout in the original keep a
placeholder module, so `out_layers.3` is still the second convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models.configs import UNetConfig
from sdcli.models.layers import attention, group_norm, timestep_embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)  # attends to the text embedding
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg.norm_groups, eps=1e-6)
        linear = cfg.use_linear_in_transformer
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        linear = isinstance(self.proj_in, nn.Linear)
        y = self.norm(x)
        if not linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # `size` is the next skip connection's: latents that are not a multiple of 8 (e.g. 520 px -> 65)
        # shrink to an odd size on the way down, so doubling would overshoot by one.
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of layers each called with what it needs: the time embedding, the context, or neither."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size: torch.Size | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_ch = ch * 4
        groups = cfg.norm_groups

        def heads_for(channels: int) -> int:
            return channels // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads

        def res_then_attn(c_in: int, c_out: int, level: int) -> TimestepSequential:
            layers: list[nn.Module] = [ResBlock(c_in, emb_ch, c_out, groups)]
            if cfg.transformer_depth[level]:
                layers.append(SpatialTransformer(c_out, heads_for(c_out), cfg.transformer_depth[level], cfg))
            return TimestepSequential(*layers)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.adm_in_channels:  # SDXL: the vector `y` (pooled text, sizes) joins the time embedding
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            )
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        c = ch
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(res_then_attn(c, mult * ch, level))
                c = mult * ch
                skip_channels.append(c)
            if level != last:
                self.input_blocks.append(TimestepSequential(Downsample(c)))
                skip_channels.append(c)

        self.middle_block = TimestepSequential(
            ResBlock(c, emb_ch, c, groups),
            SpatialTransformer(c, heads_for(c), cfg.transformer_depth_middle, cfg),
            ResBlock(c, emb_ch, c, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = res_then_attn(c + skip_channels.pop(), mult * ch, level)
                c = mult * ch
                if level and i == cfg.num_res_blocks:
                    block.append(Upsample(c))
                self.output_blocks.append(block)

        self.out = nn.Sequential(group_norm(c, groups), nn.SiLU(), nn.Conv2d(c, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise (or v) in latents x (B, C, H, W) at `timesteps` (B,) given context (B, T, D).

        `y` (B, adm_in_channels) is SDXL's extra vector (see `sdxl_size.sdxl_y`); required exactly when the
        config has `adm_in_channels`.
        """
        if (y is None) != (not self.cfg.adm_in_channels):
            want = f"a (B, {self.cfg.adm_in_channels}) vector y" if self.cfg.adm_in_channels else "no vector y"
            raise ValueError(f"this UNet takes {want}")
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))  # (B, 4C)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)  # (B, out_channels, H, W)
