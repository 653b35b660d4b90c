"""Tests for sdcli.image_noise: the order and source of every noise an image draws.

The `--rng cuda` expectations come from `nv_noise` below, written from the definitions and not from
sdcli.rng_philox: Philox4x32-10 as Random123 defines it (Salmon et al. 2011; checked against its
known-answer vectors in test_rng_philox.py), and A1111's "NV" source (modules/rng_philox.py): for a seed,
call n of `Generator.randn` gives element k from the Philox counter (n, 0, k, 0) and key (seed low word,
seed high word) as curand's Box-Muller first normal, sqrt(-2 ln u) sin(v), of words 0 and 1 with
u = w0 2^-32 + 2^-33 and v = w1 2^-32 2pi + 2^-33 2pi in float32. A1111's ImageRNG makes one such call
for the initial noise (n = 0) and one per `randn_like` of the sampler (n = 1, 2, ...).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from kdiffusion_ref import eps_denoiser
from kdiffusion_ref import load as load_kdiffusion
from PIL import Image
from reference import reference_models_from_file, reference_pipeline, reference_tokenizer

from sdcli.image_noise import BatchNoise, ImageNoise

MASK = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Random123's philox4x32-10 on Python integers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def nv_noise(seed: int, call: int, shape: tuple[int, ...], high_word: int = 0) -> torch.Tensor:
    """Call `call` of A1111's NV `Generator(seed).randn(shape)` (counter high word `high_word`, 0 in A1111)."""
    key = (seed & MASK, seed >> 32)
    words = np.array([philox4x32_10((call, high_word, k, 0), key)[:2] for k in range(math.prod(shape))])
    two_pi = np.float32(2 * math.pi)
    u = words[:, 0].astype(np.float32) * np.float32(2**-32) + np.float32(2**-33)
    v = words[:, 1].astype(np.float32) * np.float32(2**-32 * two_pi) + np.float32(2**-33 * two_pi)
    normals = np.sqrt(-2 * np.log(u.astype(np.float64))) * np.sin(v.astype(np.float64))
    return torch.from_numpy(normals.astype(np.float32)).reshape(shape)


SHAPE = (4, 2, 3)


def assert_philox_equal(ours: torch.Tensor, expected: torch.Tensor) -> None:
    # float64 log/sin rounded once on both sides; the GPU's own float32 functions differ by ulps.
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_cuda_stream_is_a1111s_nv_generator_one_counter_step_per_call():
    noise = ImageNoise(1234, "cuda")
    for call in range(3):
        assert_philox_equal(noise.next(SHAPE), nv_noise(1234, call, SHAPE))


def test_cuda_encode_noise_leaves_the_samplers_counter_steps_as_a1111s():
    noise = ImageNoise(77, "cuda")
    assert_philox_equal(noise.next(SHAPE), nv_noise(77, 0, SHAPE))
    assert_philox_equal(noise.for_encoding(SHAPE), nv_noise(77, 0, SHAPE, high_word=1))
    assert_philox_equal(noise.for_encoding(SHAPE), nv_noise(77, 1, SHAPE, high_word=1))
    assert_philox_equal(noise.next(SHAPE), nv_noise(77, 1, SHAPE))


def test_cpu_stream_draws_everything_from_one_seeded_generator_in_order():
    generator = torch.Generator().manual_seed(5)
    expected = [torch.randn(SHAPE, generator=generator) for _ in range(3)]
    noise = ImageNoise(5, "cpu")
    assert torch.equal(noise.next(SHAPE), expected[0])
    assert torch.equal(noise.for_encoding(SHAPE), expected[1])
    assert torch.equal(noise.next(SHAPE), expected[2])


def test_batch_rows_are_each_images_own_stream():
    batch = BatchNoise([3, 4], ["cuda", "cpu"])
    alone = [ImageNoise(3, "cuda"), ImageNoise(4, "cpu")]
    for _ in range(2):
        rows = batch.next(SHAPE, "cpu")
        assert rows.shape == (2, *SHAPE)
        for row, image in zip(rows, alone, strict=True):
            assert torch.equal(row, image.next(SHAPE))
    with pytest.raises(ValueError, match="2 seeds and 1 rng"):
        BatchNoise([1, 2], ["cpu"])


PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a lighthouse at dusk", "blurry", 4321, 4, 5.0, 64


def generate(checkpoint: str, out, *extra) -> np.ndarray:
    result = run_cli(
        "txt2img", PROMPT, "-n", NEGATIVE, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
        "--cfg", CFG, "--sampler", "Euler a", "--dtype", "fp32", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


def test_ancestral_noise_under_rng_cuda_equals_kdiffusion_with_a1111s_nv_draws(tiny_checkpoint, tmp_path):
    sampling, _ = load_kdiffusion()
    unet, vae, clip = reference_models_from_file(tiny_checkpoint, TINY_SD1)
    tokenizer = reference_tokenizer()

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return clip(ids).last_hidden_state

    shape = (1, 4, SIZE // 8, SIZE // 8)
    calls = iter(range(1, 100))  # A1111's TorchHijack.randn_like: the image's next NV call
    with torch.no_grad():
        model = eps_denoiser(unet)
        context = torch.cat([embed(NEGATIVE), embed(PROMPT)])

        def denoiser(x, sigma):
            uncond, cond = model(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context).chunk(2)
            return uncond + CFG * (cond - uncond)

        sigmas = model.get_sigmas(STEPS)
        x = nv_noise(SEED, 0, shape) * sigmas[0]
        latents = sampling.sample_euler_ancestral(
            denoiser, x, sigmas, disable=True, noise_sampler=lambda s, s_next: nv_noise(SEED, next(calls), shape)
        )
        expected = (vae.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
    ours = generate(tiny_checkpoint, tmp_path / "cuda.png", "--seed", SEED, "--rng", "cuda")
    assert np.abs(ours - expected).mean() < 1 / 255
    assert next(calls) == STEPS  # one draw per step but the last, to sigma 0
    cpu = generate(tiny_checkpoint, tmp_path / "cpu.png", "--seed", SEED)
    assert np.abs(ours - cpu).mean() > 5 / 255


def test_rng_cuda_images_are_the_same_alone_or_in_a_batch(tiny_checkpoint, tmp_path):
    result = run_cli(
        "txt2img", PROMPT, "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 3, "--seed", 11, "--n", 2,
        "--batch-size", 2, "--sampler", "Euler a", "--rng", "cuda", "--dtype", "fp32", "-o", tmp_path / "many.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    second = tmp_path / "many-0002.png"
    alone = tmp_path / "alone.png"
    result = run_cli(
        "txt2img", PROMPT, "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 3, "--seed", 12,
        "--sampler", "Euler a", "--rng", "cuda", "--dtype", "fp32", "-o", alone,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(alone)))


def test_img2img_under_rng_cuda_encodes_with_the_streams_other_part(tiny_checkpoint, tmp_path, monkeypatch):
    # diffusers' img2img pipeline (DDIM: no sampler noise) given the initial noise of NV call 0 and, for the
    # VAE's latent sample, the draw at counter high word 1.
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    init = tmp_path / "init.png"
    ramp = np.linspace(0, 255, SIZE)
    Image.fromarray(
        np.stack(
            [ramp[None].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), 255 - ramp[None].repeat(SIZE, 0)], -1
        ).astype(np.uint8)
    ).save(init)
    out = tmp_path / "out.png"
    result = run_cli(
        "img2img", PROMPT, "--init", init, "-m", tiny_checkpoint, "--steps", STEPS, "--cfg", CFG, "--seed", SEED,
        "--sampler", "ddim", "--strength", 0.6, "--rng", "cuda", "--dtype", "fp32", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    shape = (1, 4, SIZE // 8, SIZE // 8)
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: nv_noise(SEED, 0, shape))
    monkeypatch.setattr(
        module, "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean
        + output.latent_dist.std * nv_noise(SEED, 0, shape, high_word=1),
    )  # fmt: skip
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, tiny_checkpoint, TINY_SD1)
    expected = pipe(
        PROMPT, image=Image.open(init), strength=0.6, num_inference_steps=STEPS, guidance_scale=CFG, output_type="np"
    ).images[0]
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255
    assert np.abs(ours - expected).mean() < 1 / 255
