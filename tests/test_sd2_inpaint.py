"""SD 2.x inpainting end to end: `sdcli inpaint` on a tiny 9-channel SD 2.x checkpoint equals diffusers'
StableDiffusionInpaintPipeline on the same weights (OpenCLIP tower converted as in test_sd2).

Noise as in test_inpaint: sdcli draws the initial noise first, then the VAE samples (init image, then masked
image); the reference's `retrieve_latents` takes the same noise. The CLI pastes the kept pixels back and
diffusers does not, so the repainted area is compared with the reference and the kept area with the input.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from reference import assert_same_image
from test_img2img import patch_vae_sampling
from test_inpaint import inpainting_vae_noises
from test_sd2 import TINY_SD2, reference_scheduler, reference_sd2_pipeline, write_sd2

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a red door", "ugly", 5, 6, 7.0, 64
TINY_SD2_INPAINT = replace(TINY_SD2, name="sd2-inpaint", unet=replace(TINY_SD2.unet, in_channels=9))


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A random init image and a mask that repaints a rectangle (pure black and white: no feathering)."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:40, 20:52] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def inpaint_cli(checkpoint: str, init: Path, mask: Path, out: Path, sampler: str, strength: float, *extra) -> None:
    result = run_cli(
        "inpaint", PROMPT, "--init", init, "--mask", mask, "-m", checkpoint, "--steps", STEPS, "--cfg", CFG,
        "--seed", SEED, "--sampler", sampler, "--strength", strength, "--mask-blur", 0, "--dtype", "fp32",
        "--device", "cpu", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def assert_repainted_area_matches(out: Path, init: Path, mask: Path, expected: np.ndarray) -> None:
    """The CLI's image: the reference's where the mask repaints (`assert_same_image`), the input elsewhere."""
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255
    repaint = np.asarray(Image.open(mask)) == 255
    assert repaint.any() and (~repaint).any()
    assert_same_image(ours, expected, where=repaint)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"))[~repaint], np.asarray(Image.open(init))[~repaint])


@pytest.fixture(scope="module")
def sd2_inpaint_file(tmp_path_factory) -> tuple[str, Path, Path]:
    folder = tmp_path_factory.mktemp("sd2-inpaint")
    return write_sd2(folder / "tiny-sd2-inpaint.safetensors", TINY_SD2_INPAINT, seed=7), *write_inputs(folder)


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler_karras", 0.7)])
def test_inpaint_equals_diffusers_inpaint_pipeline(sd2_inpaint_file, tmp_path, monkeypatch, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    checkpoint, init, mask = sd2_inpaint_file
    patch_vae_sampling(monkeypatch, module, inpainting_vae_noises(SEED, strength))
    scheduler = reference_scheduler(sampler, "eps")
    pipe = reference_sd2_pipeline(checkpoint, TINY_SD2_INPAINT, scheduler, StableDiffusionInpaintPipeline)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, image=Image.open(init), mask_image=Image.open(mask), height=SIZE,
        width=SIZE, strength=strength, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    inpaint_cli(checkpoint, init, mask, out, sampler, strength, "-n", NEGATIVE)
    assert_repainted_area_matches(out, init, mask, expected)
