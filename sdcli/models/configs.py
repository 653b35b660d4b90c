"""The networks' frozen configs, and the full-size ones of SD 2.x and SDXL, as data (no torch: detection
imports this cheaply; `sdcli.families` re-exports the SD 1.x ones).

Numbers from Stability's configs (`v2-inference.yaml`, `sd_xl_base.yaml`,
`sd_xl_refiner.yaml`) and OpenCLIP's model configs
(`ViT-H-14.json`, `ViT-bigG-14.json`); the layout tests check them against the reference conversion.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # SDXL: width of the extra vector `y` (pooled text + size embeddings) added to the time embedding; 0: none.
    adm_in_channels: int = 0


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

    # The names ClipConfig uses, so tokenizers and clip skip read either kind of tower alike.
    @property
    def num_hidden_layers(self) -> int:
        return self.layers

    @property
    def max_position_embeddings(self) -> int:
        return self.context_length


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
# sd_xl_refiner.yaml: wider and one level deeper than the base, bigG's context alone.
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    num_head_channels=64,
    context_dim=1280,
    use_linear_in_transformer=True,
    adm_in_channels=2560,  # bigG's pooled 1280 + five 256-wide embeddings: original size, crop, aesthetic score
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
