"""TextConditioning batches field by field, and classifier-free guidance runs both halves in one UNet call."""

import pytest
import torch

from sdcli.conditioning import TextConditioning
from sdcli.denoiser import guided_unet


def conditioning(seed: int, batch: int = 2, pooled: bool = True) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(
        torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 3, generator=g) if pooled else None
    )


def test_cat_then_chunk_gives_back_each_field():
    a, b = conditioning(0), conditioning(1)
    both = TextConditioning.cat([a, b])
    assert both.context.shape == (4, 5, 8) and both.pooled.shape == (4, 3) and len(both) == 4
    first, second = both.chunk(2)
    for ours, original in ((first, a), (second, b)):
        assert torch.equal(ours.context, original.context) and torch.equal(ours.pooled, original.pooled)
    without = TextConditioning.cat([conditioning(0, pooled=False), conditioning(1, pooled=False)])
    assert without.pooled is None and without.context.shape == (4, 5, 8)


def test_cat_refuses_a_field_only_some_have_and_chunk_an_uneven_split():
    with pytest.raises(ValueError, match="pooled"):
        TextConditioning.cat([conditioning(0), conditioning(1, pooled=False)])
    with pytest.raises(ValueError, match="3 equal parts"):
        conditioning(0, batch=4).chunk(3)


def test_to_casts_every_field():
    half = conditioning(0).to(torch.float16)
    assert half.context.dtype == half.pooled.dtype == torch.float16
    assert conditioning(0, pooled=False).to(torch.float16).pooled is None


def fake_unet(calls: list):
    """An output that depends on x, t, the context and the pooled vector of each batch item."""

    def unet(x: torch.Tensor, t: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        calls.append(len(x))
        per_item = text.context.mean(dim=(1, 2)) + text.pooled.sum(dim=1) * 0.3 + t * 0.01  # (B,)
        return torch.sin(x * per_item[:, None, None, None])

    return unet


def test_guidance_concatenates_each_field_and_calls_the_unet_once():
    cond, uncond = conditioning(0), conditioning(1)
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([10.0, 20.0])
    calls = []
    guided = guided_unet(fake_unet(calls), cond, uncond, 7.5)(x, t)
    assert calls == [4]  # one batched call for both halves
    single = fake_unet([])
    expected = single(x, t, uncond) + 7.5 * (single(x, t, cond) - single(x, t, uncond))
    torch.testing.assert_close(guided, expected)


def test_guidance_scale_one_skips_the_unconditional_half():
    cond, uncond = conditioning(0), conditioning(1)
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([10.0, 20.0])
    calls = []
    out = guided_unet(fake_unet(calls), cond, uncond, 1.0)(x, t)
    assert calls == [2]
    assert torch.equal(out, fake_unet([])(x, t, cond))
