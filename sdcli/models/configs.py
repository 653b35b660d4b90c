"""The full-size network configs of SD 2.x and SDXL, as data (no torch: detection imports this cheaply).

Numbers from Stability's configs (`v2-inference.yaml`, `sd_xl_base.yaml`) and OpenCLIP's model configs
(`ViT-H-14.json`, `ViT-bigG-14.json`); the layout tests check them against the reference conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdcli.families import ClipConfig, UNetConfig


@dataclass(frozen=True)
class OpenClipConfig:
    """OpenCLIP's text tower: a pre-norm transformer with fused q/k/v projections and a causal mask."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    projection_dim: int = 1024  # text_projection is (width, projection_dim)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5


OPENCLIP_H = OpenClipConfig()  # ViT-H/14: SD 2.x's text encoder
OPENCLIP_BIGG = OpenClipConfig(width=1280, layers=32, heads=20, mlp_width=5120, projection_dim=1280)  # SDXL's second
CLIP_L = ClipConfig()  # OpenAI ViT-L/14: SD 1.x's text encoder and SDXL's first

SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),  # no attention at the first level
    transformer_depth_middle=10,
    num_head_channels=64,
    context_dim=2048,  # CLIP-L's 768 and OpenCLIP-bigG's 1280 side by side
    use_linear_in_transformer=True,
    adm_in_channels=2816,  # the `y` vector: bigG's pooled 1280 + six 256-wide size embeddings
)


@dataclass(frozen=True)
class TaesdConfig:
    """TAESD (madebyollin/taesd): conv + ReLU residual blocks of one width, no norms, no attention.

    One stage per resolution: the encoder's first stage follows the input conv, each later one a stride-2
    conv; the decoder's stages each end in a x2 upsample and conv, except the last. taesd (SD 1.x/2.x) and
    taesdxl (SDXL) share these numbers; only their weights differ.
    """

    channels: int = 64
    latent_channels: int = 4
    image_channels: int = 3
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # blocks per stage, full resolution first
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # blocks per stage, latent resolution first


TAESD = TaesdConfig()
