"""Tiled VAE decode/encode and the decode policy: blending, closeness to the whole decode, fallbacks."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNETS, TINY_VAES, randomize_
from reference import reference_vae
from torch import nn

from sdcli import tiling
from sdcli.models.vae import AutoencoderKL
from sdcli.tiling import decode, decode_tiled, encode, encode_tiled, is_out_of_memory, ramp_weights, tile_layout


class LocalVAE(nn.Module):
    """A stand-in whose every output pixel depends only on its own input pixel: tiling must be exact."""

    downscale = 4

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.tanh(self.mix(z)), scale_factor=self.downscale, mode="nearest")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.avg_pool2d(x, self.downscale)
        return torch.cat([pooled, pooled[:, :1]], 1), pooled.square().sum(1, keepdim=True).repeat(1, 4, 1, 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean absolute difference relative to the mean magnitude of `expected`."""
    return ((actual - expected).abs().mean() / expected.abs().mean()).item()


def set_diffusers_tiling(ref, tile_latent: int, overlap_latent: int, downscale: int) -> None:
    ref.use_tiling = True
    ref.tile_latent_min_size = tile_latent
    ref.tile_sample_min_size = tile_latent * downscale
    ref.tile_overlap_factor = overlap_latent / tile_latent


@pytest.mark.parametrize(
    "size, tile, overlap, expected",
    [
        (40, 64, 16, ([0], 40)),  # smaller than a tile: one tile
        (64, 64, 16, ([0], 64)),
        (65, 64, 16, ([0, 1], 64)),
        (112, 64, 16, ([0, 48], 64)),
        (128, 64, 16, ([0, 32, 64], 64)),  # 1024 pixels for SD: overlaps of 32, not 16 and 48
        (256, 64, 16, ([0, 48, 96, 144, 192], 64)),  # 2048 pixels for SD
        (100, 32, 0, ([0, 23, 45, 68], 32)),
    ],
)
def test_tile_layout_covers_the_size_with_the_fewest_tiles_spread_evenly(size, tile, overlap, expected):
    starts, length = tile_layout(size, tile, overlap)
    assert (starts, length) == expected
    assert length <= tile and starts[0] == 0 and starts[-1] + length == size
    assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlap kept
    if len(starts) > 1:  # and no fewer tiles of at most `tile` could cover the size with that overlap
        fewer = len(starts) - 1
        assert fewer * tile - (fewer - 1) * overlap < size


def test_tile_layout_refuses_overlap_as_large_as_the_tile():
    with pytest.raises(ValueError, match="overlap"):
        tile_layout(100, 16, 16)


@pytest.mark.parametrize(
    "size, tile, overlap, scale", [(112, 64, 16, 8), (256, 64, 16, 1), (65, 64, 16, 8), (50, 20, 6, 3)]
)
def test_ramp_weights_sum_to_one_everywhere(size, tile, overlap, scale):
    starts, length = tile_layout(size, tile, overlap)
    total = torch.zeros(size * scale)
    for start, w in zip(starts, ramp_weights(starts, length, scale), strict=True):
        assert (w > 0).all() and (w <= 1).all()
        total[start * scale : start * scale + len(w)] += w
    torch.testing.assert_close(total, torch.ones_like(total))


def test_ramp_weights_of_three_overlapping_tiles_stay_positive():
    # Overlap above half the tile: three tiles share some pixels, the raw ramps no longer sum to 1, and
    # the blend divides by their total (the pixelwise test below checks the result).
    starts, length = tile_layout(40, 16, 10)
    total = torch.zeros(40)
    for start, w in zip(starts, ramp_weights(starts, length, 1), strict=True):
        total[start : start + length] += w
    assert (total > 0).all()


def test_tiled_decode_and_encode_are_exact_for_a_pixelwise_vae():
    vae = randomize_(LocalVAE())
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 40, 56, generator=g)
    torch.testing.assert_close(decode_tiled(vae, z, 16, 6), vae.decode(z))
    torch.testing.assert_close(decode_tiled(vae, z, 16, 10), vae.decode(z))  # three tiles share some pixels
    x = torch.rand(2, 3, 160, 224, generator=g) * 2 - 1
    for tiled, whole in zip(encode_tiled(vae, x, 64, 24), vae.encode(x), strict=True):
        torch.testing.assert_close(tiled, whole)


# Tiles cannot equal the whole decode: group norms and the middle block's attention see one tile only.
# Measured on these random tiny VAEs (latents 36x28, tiles of 24 overlapping by 12: 4 tiles; seeds 2-4),
# mean relative error: decode 0.05-0.11 (diffusers' own tiled decode with the same tile and overlap:
# 0.08-0.16), encoded mean 0.05-0.07 (diffusers 0.08-0.11), log-variance 0.04-0.07. The tests ask for no
# worse than diffusers and a fixed bound with margin over what we measured.
MAX_TILED_ERROR = 0.15
LATENT_H, LATENT_W, TILE, OVERLAP = 36, 28, 24, 12


@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_tiled_decode_is_close_to_whole_decode_and_no_worse_than_diffusers(name):
    cfg = TINY_VAES[name]
    vae = randomize_(AutoencoderKL(cfg), seed=2)
    f = vae.downscale
    z = torch.randn(1, cfg.embed_dim, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(0))
    assert len(tile_layout(LATENT_H, TILE, OVERLAP)[0]) * len(tile_layout(LATENT_W, TILE, OVERLAP)[0]) == 4
    ref = reference_vae(vae.state_dict(), TINY_UNETS["a"], cfg)
    set_diffusers_tiling(ref, TILE, OVERLAP, f)
    with torch.no_grad():
        whole = vae.decode(z)
        theirs = ref.decode(z).sample
    ours = decode_tiled(vae, z, TILE, OVERLAP)
    assert ours.shape == whole.shape == (1, 3, LATENT_H * f, LATENT_W * f)
    assert relative_error(ours, whole) <= min(MAX_TILED_ERROR, relative_error(theirs, whole))


@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_tiled_encode_is_close_to_whole_encode_and_no_worse_than_diffusers(name):
    cfg = TINY_VAES[name]
    vae = randomize_(AutoencoderKL(cfg), seed=2)
    f = vae.downscale
    x = torch.rand(1, 3, LATENT_H * f, LATENT_W * f, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = reference_vae(vae.state_dict(), TINY_UNETS["a"], cfg)
    set_diffusers_tiling(ref, TILE, OVERLAP, f)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        theirs = ref.encode(x).latent_dist
    tiled_mean, tiled_logvar = encode_tiled(vae, x, TILE * f, OVERLAP * f)
    assert tiled_mean.shape == mean.shape
    assert relative_error(tiled_mean, mean) <= min(MAX_TILED_ERROR, relative_error(theirs.mean, mean))
    assert relative_error(tiled_logvar, logvar) <= MAX_TILED_ERROR


def test_encode_tiled_refuses_sizes_that_are_not_multiples_of_the_factor():
    vae = LocalVAE()
    with pytest.raises(ValueError, match="multiple"):
        encode_tiled(vae, torch.zeros(1, 3, 130, 128), 64, 16)


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    return randomize_(AutoencoderKL(TINY_VAES["a"]), seed=3)


def overflow_below_fp32(module: nn.Module) -> None:
    """Make `module` give inf whenever it runs in less than fp32, as an fp16-unsafe VAE does."""

    def hook(_module, _inputs, output):
        return output if output.dtype == torch.float32 else torch.full_like(output, float("inf"))

    module.register_forward_hook(hook)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tiled", [False, True])
def test_non_finite_half_precision_decode_is_redone_in_fp32(tiny_vae, dtype, tiled):
    z = torch.randn(1, 4, 10, 8, generator=torch.Generator().manual_seed(1))  # small: half precision is slow on CPUs
    with torch.no_grad():
        expected = decode_tiled(tiny_vae, z, 6, 2) if tiled else tiny_vae.decode(z)
    half = tiny_vae.to(dtype)
    overflow_below_fp32(half.decoder)
    messages = []
    image = decode(half, z, tiling=tiled, warn=messages.append, tile_latent=6, overlap_latent=2)
    assert len(messages) == 1 and "non-finite" in messages[0] and "fp32" in messages[0]
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-2 * expected.abs().max().item())
    assert next(half.parameters()).dtype == dtype  # the caller's VAE is left in its precision


def test_fp32_fallback_warns_through_warnings_by_default(tiny_vae):
    half = tiny_vae.to(torch.bfloat16)
    overflow_below_fp32(half.decoder)
    with pytest.warns(RuntimeWarning, match="decoding again in fp32"):
        image = decode(half, torch.randn(1, 4, 6, 6), tiling=False)
    assert torch.isfinite(image).all()


def test_finite_decode_is_not_redone_and_does_not_warn(tiny_vae):
    z = torch.randn(1, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode(tiny_vae.to(torch.bfloat16), z, tiling=False)
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def spy_on(monkeypatch, name: str) -> list:
    """Record the input shapes the policy hands to `tiling.<name>` (decode_tiled or encode_tiled)."""
    calls = []
    real = getattr(tiling, name)

    def spy(vae, x, *args):
        calls.append(tuple(x.shape))
        return real(vae, x, *args)

    monkeypatch.setattr(tiling, name, spy)
    return calls


@pytest.fixture
def tiled_calls(monkeypatch) -> list:
    return spy_on(monkeypatch, "decode_tiled")


@pytest.mark.parametrize(
    "tiling_arg, size, expect_tiled",
    [(None, 12, True), (None, 8, False), (True, 8, True), (False, 12, False)],
)
def test_decode_and_encode_tile_when_asked_or_above_the_area_threshold(
    monkeypatch, tiny_vae, tiled_calls, tiling_arg, size, expect_tiled
):
    monkeypatch.setattr(tiling, "available_memory", lambda device: None)  # the threshold decides
    monkeypatch.setattr(tiling, "AUTO_TILE_LATENT_AREA", 10 * 10)
    encode_calls = spy_on(monkeypatch, "encode_tiled")
    decode(tiny_vae, torch.randn(1, 4, size, size), tiling=tiling_arg, tile_latent=8, overlap_latent=4)
    f = tiny_vae.downscale
    mean, logvar = encode(tiny_vae, torch.rand(1, 3, size * f, size * f), tiling=tiling_arg, tile=8 * f, overlap=4 * f)
    assert bool(tiled_calls) == bool(encode_calls) == expect_tiled
    assert mean.shape == logvar.shape == (1, 4, size, size) and mean.dtype == torch.float32


def test_default_threshold_is_above_768_pixels_for_sd(monkeypatch, tiled_calls):
    monkeypatch.setattr(tiling, "available_memory", lambda device: None)
    encode_calls = spy_on(monkeypatch, "encode_tiled")
    vae = LocalVAE()
    vae.downscale = 8  # as SD's VAE
    decode(vae, torch.zeros(1, 4, 96, 96))  # 768x768
    encode(vae, torch.zeros(1, 3, 768, 768))
    assert tiled_calls == encode_calls == []
    decode(vae, torch.zeros(1, 4, 96, 104))  # 832x768
    encode(vae, torch.zeros(1, 3, 768, 832))
    assert len(tiled_calls) == len(encode_calls) == 1


@pytest.mark.parametrize("batch", [1, 2])
def test_auto_tiles_when_a_whole_pass_needs_more_than_half_the_free_memory(monkeypatch, tiny_vae, tiled_calls, batch):
    encode_calls = spy_on(monkeypatch, "encode_tiled")
    f, cfg = tiny_vae.downscale, tiny_vae.cfg
    z, x = torch.randn(batch, 4, 12, 12), torch.rand(batch, 3, 12 * f, 12 * f)
    need = batch * (12 * f) ** 2 * 3 * cfg.ch * max(cfg.ch_mult[:2]) * 4  # fp32: 4 bytes
    for free, expect_tiled in ((2 * need, False), (2 * need - 1, True)):
        monkeypatch.setattr(tiling, "available_memory", lambda device, free=free: free)
        tiled_calls.clear(), encode_calls.clear()
        decode(tiny_vae, z, tile_latent=8, overlap_latent=4)
        encode(tiny_vae, x, tile=8 * f, overlap=4 * f)
        assert bool(tiled_calls) == bool(encode_calls) == expect_tiled, free


def test_available_memory_reads_meminfo_on_the_cpu(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(tiling, "MEMINFO", meminfo)
    assert tiling.available_memory(torch.device("cpu")) == 20000000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")  # old kernels have no MemAvailable
    assert tiling.available_memory(torch.device("cpu")) is None
    monkeypatch.setattr(tiling, "MEMINFO", tmp_path / "absent")
    assert tiling.available_memory(torch.device("cpu")) is None
    assert tiling.available_memory(torch.device("meta")) is None


def test_non_finite_half_precision_encode_is_redone_in_fp32(tiny_vae):
    x = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = tiny_vae.encode(x)
    half = tiny_vae.to(torch.bfloat16)
    overflow_below_fp32(half.encoder)
    messages = []
    mean, logvar = encode(half, x, tiling=False, warn=messages.append)
    assert len(messages) == 1 and "encoding again in fp32" in messages[0]
    for actual, wanted in zip((mean, logvar), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-2 * wanted.abs().max().item())


def oom_above(vae: nn.Module, side: int, error: Exception, method: str = "decode") -> None:
    """Make `vae.<method>` fail with `error` on inputs larger than `side`, as a GPU with little memory would."""
    real = getattr(vae, method)

    def run_or_fail(x):
        if max(x.shape[-2:]) > side:
            raise error
        return real(x)

    setattr(vae, method, run_or_fail)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory."), RuntimeError("DefaultCPUAllocator: can't allocate memory")],
)
def test_out_of_memory_decode_is_retried_in_tiles(tiny_vae, tiled_calls, error):
    z = torch.randn(1, 4, 12, 12)
    expected = decode_tiled(tiny_vae, z, 8, 4)
    tiled_calls.clear()
    oom_above(tiny_vae, 8, error)
    messages = []
    image = decode(tiny_vae, z, warn=messages.append, tile_latent=8, overlap_latent=4)
    assert tiled_calls == [(1, 4, 12, 12)]
    assert len(messages) == 1 and "out of memory" in messages[0]
    torch.testing.assert_close(image, expected)


def test_out_of_memory_encode_is_retried_in_tiles(monkeypatch, tiny_vae):
    encode_calls = spy_on(monkeypatch, "encode_tiled")
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    expected = encode_tiled(tiny_vae, x, 16, 8)
    encode_calls.clear()
    oom_above(tiny_vae, 16, torch.OutOfMemoryError("CUDA out of memory."), method="encode")
    messages = []
    mean, logvar = encode(tiny_vae, x, warn=messages.append, tile=16, overlap=8)
    assert encode_calls == [(1, 3, 24, 24)]
    assert messages == ["VAE encode ran out of memory at 24x24; encoding in tiles instead"]
    torch.testing.assert_close((mean, logvar), expected)


def test_out_of_memory_is_raised_when_tiling_is_off_or_already_on(tiny_vae):
    oom_above(tiny_vae, 4, torch.OutOfMemoryError("CUDA out of memory."))
    z = torch.randn(1, 4, 12, 12)
    with pytest.raises(torch.OutOfMemoryError):
        decode(tiny_vae, z, tiling=False)
    with pytest.raises(torch.OutOfMemoryError):
        decode(tiny_vae, z, tiling=True, tile_latent=8, overlap_latent=4)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tiny_vae):
    oom_above(tiny_vae, 4, RuntimeError("Given groups=1, weight of size [64, 4, 3, 3], expected input"))
    with pytest.raises(RuntimeError, match="groups"):
        decode(tiny_vae, torch.randn(1, 4, 12, 12))


@pytest.mark.parametrize(
    "error, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected
