"""SDXL inpainting models (9-channel SDXL UNet, e.g. sd_xl_base_1.0_inpainting_0.1) detected as `sdxl-inpaint`
and run end to end against diffusers' StableDiffusionXLInpaintPipeline (the SDXL refiner: test_sdxl_refiner).

The reference is set up as in test_sdxl (base-model settings: no aesthetic score, zeros for a missing negative
prompt), the noise and the comparison as in test_sd2_inpaint.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_img2img import patch_vae_sampling
from test_inpaint import inpainting_vae_noises
from test_layout_sd2_sdxl import SDXL_YAML, meta_state_dict, numel, reference_unet_from_yaml
from test_sd2_inpaint import assert_repainted_area_matches, inpaint_cli, write_inputs
from test_sdxl import TINY_SDXL, reference_scheduler, reference_sdxl_pipeline, write_sdxl

from sdcli.families import SDXL_INPAINT, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.header import read_header
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL
from sdcli.text_encoders import build_text_encoder

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a red door", "ugly", 5, 6, 7.0, 64
TINY_SDXL_INPAINT = replace(TINY_SDXL, name="sdxl-inpaint", unet=replace(TINY_SDXL.unet, in_channels=9))


@pytest.fixture(scope="module")
def sdxl_inpaint_file(tmp_path_factory) -> tuple[str, Path, Path]:
    folder = tmp_path_factory.mktemp("sdxl-inpaint")
    return write_sdxl(folder / "tiny-sdxl-inpaint.safetensors", TINY_SDXL_INPAINT, seed=11), *write_inputs(folder)


def test_sdxl_inpainting_checkpoint_is_detected_with_the_sdxl_defaults(sdxl_inpaint_file):
    family = detect({k: v.shape for k, v in read_header(Path(sdxl_inpaint_file[0])).items()})
    assert family.name == "sdxl-inpaint" and family.is_inpainting
    assert family.unet == TINY_SDXL_INPAINT.unet
    assert [s.config for s in family.text_encoders] == [s.config for s in TINY_SDXL.text_encoders]
    assert (family.scale_factor, family.default_size, family.zero_missing_negative) == (0.13025, 1024, True)
    assert SDXL_INPAINT.unet.adm_in_channels == 2816 and SDXL_INPAINT.unet.in_channels == 9


def test_full_size_sdxl_inpainting_layout_is_what_diffusers_expects_and_is_detected():
    from diffusers.loaders import single_file_utils as sfu

    unet = meta_state_dict(UNetModel, SDXL_INPAINT.unet, UNET_PREFIX)
    ref = reference_unet_from_yaml({**SDXL_YAML, "in_channels": 9}, unet)  # sd_xl_base's yaml, 9 channels in
    assert ref.config.in_channels == 9 and numel(unet.values()) == numel(ref.parameters())
    checkpoint = unet | meta_state_dict(AutoencoderKL, SDXL_INPAINT.vae, VAE_PREFIX)
    for spec in SDXL_INPAINT.text_encoders:
        with torch.device("meta"):
            checkpoint |= {spec.prefix + k: v for k, v in build_text_encoder(spec).state_dict().items()}
    assert sfu.infer_diffusers_model_type(checkpoint) == "xl_inpaint"
    assert detect({k: tuple(v.shape) for k, v in checkpoint.items()}) == SDXL_INPAINT


# (sampler, strength, our options, diffusers' arguments): no negative prompt (zero embeddings) from pure noise;
# a negative prompt, from the init image, with another original size and a crop.
CASES = {
    "ddim-zero-negative": ("ddim", 1.0, (), {}),
    "euler-negative-and-sizes": (
        "euler_karras", 0.7, ("-n", NEGATIVE, "--original-size", "96x80", "--crop", "8,16"),
        {"negative_prompt": NEGATIVE, "original_size": (80, 96), "crops_coords_top_left": (16, 8)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_inpaint_equals_diffusers_sdxl_inpaint_pipeline(sdxl_inpaint_file, tmp_path, monkeypatch, case):
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module

    sampler, strength, options, arguments = CASES[case]
    checkpoint, init, mask = sdxl_inpaint_file
    patch_vae_sampling(monkeypatch, module, inpainting_vae_noises(SEED, strength))
    pipe = reference_sdxl_pipeline(
        checkpoint, reference_scheduler(sampler), StableDiffusionXLInpaintPipeline, TINY_SDXL_INPAINT
    )
    assert pipe.config.requires_aesthetics_score is False
    expected = pipe(
        PROMPT, image=Image.open(init), mask_image=Image.open(mask), height=SIZE, width=SIZE, strength=strength,
        num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np", **arguments,
    ).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    inpaint_cli(checkpoint, init, mask, out, sampler, strength, *options)
    assert_repainted_area_matches(out, init, mask, expected)


def test_sdxl_inpainting_model_refuses_txt2img(sdxl_inpaint_file, tmp_path):
    result = run_cli("txt2img", PROMPT, "-m", sdxl_inpaint_file[0], "--steps", 1, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "inpainting model" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_models_lists_sdxl_inpaint(sdxl_inpaint_file, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    source = sdxl_inpaint_file[0]
    (folder / Path(source).name).symlink_to(source)
    result = run_cli("models", "--weights-dir", folder, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert (rows["tiny-sdxl-inpaint"]["family"], rows["tiny-sdxl-inpaint"]["prediction"]) == ("sdxl-inpaint", "eps")
