"""SDXL img2img end to end: `sdcli img2img` on a tiny SDXL-shaped checkpoint equals diffusers'
StableDiffusionXLImg2ImgPipeline on the same weights (converted as in test_sdxl).

A base model: no aesthetic score in the size conditioning (`requires_aesthetics_score=False`); diffusers takes
the original and target sizes from the init image's latents, as sdcli takes them from the image. Noise as in
test_img2img: sdcli draws the initial noise first and the VAE's sample after it; the reference's
`retrieve_latents` takes that same sample.
"""

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from reference import assert_same_image
from test_img2img import patch_vae_sampling, pixels, sdcli_latent_noises
from test_sdxl import reference_scheduler, reference_sdxl_pipeline, write_sdxl

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a watercolour harbour", "blurry", 99, 8, 6.0, 64


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("sdxl-img2img")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIZE)
    rgb = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), rng.uniform(0, 255, (SIZE, SIZE))])
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(folder / "init.png")
    return write_sdxl(folder / "tiny-sdxl.safetensors", seed=5), str(folder / "init.png")


# (sampler, strength, our options, diffusers' arguments): no negative prompt (zero embeddings) at the default
# sizes; a negative prompt with another original size and a crop (diffusers: (height, width), (top, left)).
CASES = {
    "ddim-zero-negative": ("ddim", 0.75, (), {}),
    "euler-negative-and-sizes": (
        "euler_karras", 0.5, ("-n", NEGATIVE, "--original-size", "96x80", "--crop", "8,16"),
        {"negative_prompt": NEGATIVE, "original_size": (80, 96), "crops_coords_top_left": (16, 8)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_img2img_equals_diffusers_sdxl_img2img_pipeline(files, tmp_path, monkeypatch, case):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    sampler, strength, options, arguments = CASES[case]
    checkpoint, init = files
    _, vae_noise = sdcli_latent_noises(SEED, 2)
    patch_vae_sampling(monkeypatch, module, [vae_noise])
    pipe = reference_sdxl_pipeline(checkpoint, reference_scheduler(sampler), StableDiffusionXLImg2ImgPipeline)
    assert pipe.config.requires_aesthetics_score is False
    expected = pipe(
        PROMPT, image=Image.open(init), strength=strength, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **arguments,
    ).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    result = run_cli(
        "img2img", PROMPT, "--init", init, "-m", checkpoint, "--steps", STEPS, "--cfg", CFG, "--seed", SEED,
        "--sampler", sampler, "--strength", strength, "--dtype", "fp32", "--device", "cpu", "-o", out, *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_same_image(pixels(out), expected)
