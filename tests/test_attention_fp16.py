"""Attention in fp16 with the large q.k^T products of SD 2.x (why diffusers upcasts SD 2.1's attention): the
products overflow fp16 when formed naively, yet sdcli's attention stays finite and as close to a float64
reference on the same fp16 inputs as fp16 output rounding allows."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdcli.models import layers

BATCH, TOKENS, HEADS, HEAD_WIDTH = 2, 256, 2, 64  # SD 2.x's 64-wide heads


def large_qkv(magnitude: float = 100.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 (B, N, C) projections whose per-head q.k^T have a standard deviation of magnitude^2 * sqrt(64), 80000
    at 100: above fp16's 65504 before the 1/8 scale, thousands after it."""
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, TOKENS, HEADS * HEAD_WIDTH)
    q, k = (torch.randn(shape, generator=g) * magnitude for _ in range(2))
    return q.half(), k.half(), torch.randn(shape, generator=g).half()


def per_head(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(BATCH, TOKENS, HEADS, HEAD_WIDTH).transpose(1, 2)  # (B, heads, N, d)


def naive_half_product(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q.k^T per head in fp16 before any scale, as LDM's attention forms it."""
    return per_head(q) @ per_head(k).transpose(-1, -2)


def error_against_float64(out: torch.Tensor, q, k, v) -> torch.Tensor:
    """|out - softmax(q.k^T / sqrt(d)) v|, the reference computed in float64 from the same fp16 values."""
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    q, k, v = (per_head(t.double()) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / HEAD_WIDTH**0.5, dim=-1)
    reference = (weights @ v).transpose(1, 2).reshape(BATCH, TOKENS, HEADS * HEAD_WIDTH)
    return (out.double() - reference).abs()


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_fp16_attention_with_overflowing_products_matches_float64(backend):
    q, k, v = large_qkv()
    assert torch.isinf(naive_half_product(q, k)).any()  # the input does overflow a naive fp16 attention
    with sdpa_kernel(backend):
        error = error_against_float64(layers.attention(q, k, v, HEADS), q, k, v)
    # fp16 keeps 11 significant bits: outputs of size ~4 round to within 2^-9; the mean is far smaller.
    assert error.max() < 2**-8 and error.mean() < 1e-5


def test_q_is_scaled_first_where_sdpa_multiplies_in_fp16(monkeypatch):
    """A model of MPS's MPSGraph fallback (fp16 q.k^T, then the scale in fp32): naive, it overflows; with q
    scaled first, as sdcli does on MPS, it is finite and close. Not as close as the fp32-accumulating kernels:
    logits of thousands rounded to fp16 swap the largest weights where two are within a few units."""

    def mps_graph_sdpa(q, k, v, is_causal=False, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1)  # the product in fp16
        return weights.to(v.dtype) @ v

    q, k, v = large_qkv()
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", mps_graph_sdpa)  # undone after the test
    assert not torch.isfinite(layers.attention(q, k, v, HEADS)).all()  # on the CPU sdcli does not scale first
    monkeypatch.setattr(layers, "_scale_q_first", lambda q: True)
    assert error_against_float64(layers.attention(q, k, v, HEADS), q, k, v).mean() < 2e-3
