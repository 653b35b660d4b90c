"""img2img end to end against diffusers' StableDiffusionImg2ImgPipeline on the same tiny random weights.

Conventions that differ, and how the test aligns them: sdcli draws an image's noise from its seed first
(so a seed means the same noise as in txt2img) and the VAE's latent sample after it; diffusers draws the
latent sample first. The reference's `retrieve_latents` is replaced by one that takes the same
distribution's mean and std with the noise in sdcli's order; everything else is diffusers' own code.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from PIL import Image
from reference import reference_models_from_file, reference_pipeline

PROMPT, SEED, STEPS, CFG, SIZE = "a watercolour harbour", 99, 8, 6.0, 64


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIZE)
    rgb = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), rng.uniform(0, 255, (SIZE, SIZE))])
    path = tmp_path_factory.mktemp("img") / "init.png"
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(path)
    return path


def sdcli_latent_noises(seed: int, count: int, shape=(1, 4, SIZE // 8, SIZE // 8)) -> list[torch.Tensor]:
    """The draws sdcli makes from an image's generator, in order: initial noise, then VAE samples."""
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def patch_vae_sampling(monkeypatch, module, noises: list[torch.Tensor]) -> None:
    """Make diffusers' VAE sampling use sdcli's noise order (see the module docstring)."""
    queue = list(noises)

    def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):
        dist = encoder_output.latent_dist
        return dist.mean + dist.std * queue.pop(0)

    monkeypatch.setattr(module, "retrieve_latents", retrieve_latents)


@pytest.mark.parametrize("strength", [0.75, 0.5])
def test_img2img_ddim_equals_diffusers_img2img_pipeline(tiny_checkpoint, init_png, tmp_path, monkeypatch, strength):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    out = tmp_path / "out.png"
    result = run_cli(
        "img2img", PROMPT, "--init", init_png, "-m", tiny_checkpoint, "--steps", STEPS, "--cfg", CFG,
        "--seed", SEED, "--sampler", "ddim", "--strength", strength, "--dtype", "fp32", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    _, vae_noise = sdcli_latent_noises(SEED, 2)
    patch_vae_sampling(monkeypatch, module, [vae_noise])
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, tiny_checkpoint, TINY_SD1)
    expected = pipe(
        PROMPT, image=Image.open(init_png), strength=strength, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    assert np.abs(pixels(out) - expected).mean() < 1 / 255


def test_strength_zero_returns_the_vae_round_trip(tiny_checkpoint, init_png, tmp_path):
    out = tmp_path / "zero.png"
    result = run_cli(
        "img2img", PROMPT, "--init", init_png, "-m", tiny_checkpoint, "--strength", 0, "--seed", SEED,
        "--dtype", "fp32", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _, vae, _ = reference_models_from_file(tiny_checkpoint, TINY_SD1)
    image = torch.from_numpy(pixels(init_png)).float().permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        _, eps = sdcli_latent_noises(SEED, 2)
        expected = vae.decode(dist.mean + dist.std * eps).sample  # latents scaled and unscaled: a no-op
    expected = (expected / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(pixels(out) - expected).mean() < 1 / 255


def test_strength_one_is_txt2img_from_pure_noise(tiny_checkpoint, init_png, tmp_path):
    common = ["-m", tiny_checkpoint, "--steps", 4, "--seed", SEED, "-W", SIZE, "-H", SIZE, "--sampler", "euler"]
    assert (
        run_cli("img2img", PROMPT, "--init", init_png, "--strength", 1, "-o", tmp_path / "a.png", *common).exit_code
        == 0
    )
    assert run_cli("txt2img", PROMPT, "-o", tmp_path / "b.png", *common).exit_code == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "heun", "lms", "dpmpp_sde", "ddpm"])
def test_every_sampler_runs_img2img(tiny_checkpoint, init_png, tmp_path, sampler):
    out = tmp_path / f"{sampler}.png"
    result = run_cli(
        "img2img", PROMPT, "--init", init_png, "-m", tiny_checkpoint, "--steps", 4, "--sampler", sampler, "-o", out
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (SIZE, SIZE)


def test_size_defaults_to_the_init_image_rounded_down_to_8_and_strength_is_recorded(tiny_checkpoint, tmp_path):
    from sdcli.images import read_png_parameters
    from sdcli.infotext import parse_infotext

    init = tmp_path / "odd.jpg"
    Image.new("RGB", (75, 70), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    result = run_cli("img2img", PROMPT, "--init", init, "-m", tiny_checkpoint, "--steps", 2, "-o", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (72, 64)
    params = parse_infotext(read_png_parameters(out))[2]
    assert params["Denoising strength"] == "0.75" and params["Size"] == "72x64"


def test_transparent_init_is_composited_on_white_and_resize_modes_give_the_size(tiny_checkpoint, tmp_path):
    init = tmp_path / "rgba.png"
    Image.new("RGBA", (128, 64), (0, 0, 0, 0)).save(init)
    for mode in ("crop", "fit", "stretch"):
        out = tmp_path / f"{mode}.png"
        result = run_cli(
            "img2img", PROMPT, "--init", init, "-m", tiny_checkpoint, "--steps", 1, "-W", 64, "-H", 64,
            "--resize", mode, "--strength", 0, "-o", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not an image"), "cannot read image"),
        (lambda p: None, "image not found"),
    ],
)
def test_unreadable_init_is_a_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, make, message):
    init = tmp_path / "init.png"
    make(init)
    out = tmp_path / "out" / "never.png"
    result = run_cli("img2img", PROMPT, "--init", init, "-m", tiny_checkpoint, "-o", out)
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr.lower(), result.stderr
    assert not out.parent.exists()
