"""Inpainting end to end, with a regular (4-channel) and an inpainting (9-channel) tiny random checkpoint,
against diffusers' StableDiffusionInpaintPipeline on the same weights.

Conventions aligned as in test_img2img: sdcli draws the initial noise first, then the VAE samples (init
image, then masked image); the reference's `retrieve_latents` takes the same noise in that order. The
comparison is before paste-back (diffusers pastes nothing back); paste-back is tested on its own.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, TINY_SD1_INPAINT, run_cli
from PIL import Image
from reference import assert_same_image, reference_pipeline
from test_img2img import patch_vae_sampling, sdcli_latent_noises

from sdcli.batch import load_inputs
from sdcli.checkpoint import load_model
from sdcli.pipeline import GenerationRequest, generate

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a red door", "ugly", 5, 6, 7.0, 64


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:40, 20:52] = 255  # repaint a rectangle
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def inpainting_vae_noises(seed: int, strength: float) -> list[torch.Tensor]:
    """The noise of each VAE sample diffusers' pipeline takes for a 9-channel UNet, in its order: the init
    image is encoded only below strength 1 (it starts from it), the masked image always."""
    _, image_noise, masked_noise = sdcli_latent_noises(seed, 3)
    return [image_noise, masked_noise] if strength < 1 else [masked_noise]


@pytest.mark.parametrize(
    ("checkpoint_name", "family"), [("tiny_checkpoint", TINY_SD1), ("tiny_inpaint_checkpoint", TINY_SD1_INPAINT)]
)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_ddim_equals_diffusers_inpaint_pipeline(
    request, images, monkeypatch, checkpoint_name, family, strength
):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    checkpoint = request.getfixturevalue(checkpoint_name)
    init, mask = images
    # Mask blur 0: diffusers binarises the mask it is given and has no feathering of its own.
    init_image, mask_image = load_inputs(init, mask, (None, None), mask_blur=0)
    model = load_model(checkpoint, dtype=torch.float32)
    assert model.family.is_inpainting == (family is TINY_SD1_INPAINT)
    ours = generate(
        model,
        [GenerationRequest(PROMPT, NEGATIVE, SIZE, SIZE, STEPS, CFG, "ddim", SEED, init=init_image, mask=mask_image,
                           strength=strength)],
    )  # fmt: skip
    ours = (ours / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()

    # A 4-channel UNet: diffusers encodes the init image, then the masked image (which sdcli does not need).
    noises = inpainting_vae_noises(SEED, strength) if family.is_inpainting else sdcli_latent_noises(SEED, 3)[1:]
    patch_vae_sampling(monkeypatch, module, noises)
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, checkpoint, family)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, image=Image.open(init), mask_image=Image.open(mask), height=SIZE,
        width=SIZE, strength=strength, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    assert_same_image(ours, expected)


@pytest.mark.parametrize("checkpoint_name", ["tiny_checkpoint", "tiny_inpaint_checkpoint"])
def test_pixels_outside_the_feathered_mask_are_the_input_exactly(request, images, tmp_path, checkpoint_name):
    init, mask = images
    out = tmp_path / "out.png"
    result = run_cli(
        "inpaint", PROMPT, "--init", init, "--mask", mask, "-m", request.getfixturevalue(checkpoint_name),
        "--steps", 3, "--mask-blur", 4, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _, feathered = load_inputs(init, mask, (None, None), mask_blur=4)
    keep = np.asarray(feathered) == 0
    original = np.asarray(Image.open(init).convert("RGB"))
    generated = np.asarray(Image.open(out).convert("RGB"))
    assert keep.any() and (~keep).any()
    assert np.array_equal(generated[keep], original[keep])
    assert not np.array_equal(generated[~keep], original[~keep])


def test_invert_mask_keeps_the_white_area(tiny_checkpoint, images, tmp_path):
    init, mask = images
    out = tmp_path / "inv.png"
    result = run_cli(
        "inpaint", PROMPT, "--init", init, "--mask", mask, "-m", tiny_checkpoint, "--steps", 2,
        "--mask-blur", 0, "--invert-mask", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    white = np.asarray(Image.open(mask)) == 255
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"))[white], np.asarray(Image.open(init))[white])


def test_mask_of_another_size_is_resized_with_a_warning(tiny_checkpoint, images, tmp_path):
    init, mask = images
    small = tmp_path / "small-mask.png"
    Image.open(mask).resize((32, 32)).save(small)
    out = tmp_path / "out.png"
    result = run_cli("inpaint", PROMPT, "--init", init, "--mask", small, "-m", tiny_checkpoint, "--steps", 2, "-o", out)
    assert result.exit_code == 0, result.output
    assert "warning: the mask is 32x32 but the init image is 64x64" in result.stderr
    assert Image.open(out).size == (SIZE, SIZE)


def test_mask_with_alpha_uses_its_opacity(tiny_checkpoint, images, tmp_path):
    init, _ = images
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[:, :32, 3] = 255  # left half painted (opaque) = repaint; the colour is black throughout
    alpha_mask = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(alpha_mask)
    out = tmp_path / "out.png"
    result = run_cli(
        "inpaint", PROMPT, "--init", init, "--mask", alpha_mask, "-m", tiny_checkpoint, "--steps", 2,
        "--mask-blur", 0, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    original, generated = np.asarray(Image.open(init)), np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(generated[:, 32:], original[:, 32:])


def test_inpainting_model_refuses_txt2img(tiny_inpaint_checkpoint, tmp_path):
    result = run_cli("txt2img", PROMPT, "-m", tiny_inpaint_checkpoint, "--steps", 2, "-o", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "inpainting model" in result.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (lambda p: Image.new("L", (SIZE, SIZE), 0).save(p), "nothing to inpaint"),
        (lambda p: p.write_text("not a mask"), "cannot read mask"),
    ],
)
def test_bad_masks_are_one_line_errors_and_write_nothing(tiny_checkpoint, images, tmp_path, make_mask, message):
    init, _ = images
    bad = tmp_path / "bad.png"
    make_mask(bad)
    out = tmp_path / "out" / "never.png"
    result = run_cli("inpaint", PROMPT, "--init", init, "--mask", bad, "-m", tiny_checkpoint, "-o", out)
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.parent.exists()
