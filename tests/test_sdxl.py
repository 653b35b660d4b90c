"""SDXL end to end: the CLI on a tiny SDXL-shaped checkpoint equals diffusers' StableDiffusionXLPipeline.

The reference holds the same file's weights through diffusers' single-file conversion: CLIP-L
(`convert_ldm_clip_checkpoint`), OpenCLIP bigG (`convert_open_clip_checkpoint`, with its projection), the UNet
with its "text_time" addition embedding, and the VAE with SDXL's scale factor. Without `-n` both sides give
the unconditional branch zero embeddings (diffusers' `force_zeros_for_empty_prompt`).
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_state_dict
from PIL import Image
from reference import (
    _prefixed,
    ldm_original_config,
    reference_clip_sdxl,
    reference_open_clip,
    reference_tokenizer,
    reference_vae,
    sd15_ddim_scheduler,
)

from sdcli.families import SDXL, SDXL_BIGG_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.models.configs import ClipConfig, OpenClipConfig, UNetConfig, VAEConfig
from sdcli.models.sdxl_size import SIZE_EMBEDDING_DIM

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a photo of a cat", "blurry", 1234, 5, 5.0, 64
PROJECTION = 32

# SDXL's shape in small: no attention at the first level, two transformer blocks below, 64-wide heads, two
# towers (real vocabulary) whose penultimate states sit side by side, and a label embedding for y.
TINY_SDXL = replace(
    SDXL,
    unet=UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2), transformer_depth_middle=2,
        num_head_channels=64, context_dim=128, use_linear_in_transformer=True,
        adm_in_channels=PROJECTION + 6 * SIZE_EMBEDDING_DIM,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_encoders=(
        replace(
            SDXL.text_encoders[0],
            config=ClipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1),
        ),
        replace(
            SDXL.text_encoders[1],
            config=OpenClipConfig(width=64, layers=3, heads=1, mlp_width=128, projection_dim=PROJECTION),
        ),
    ),
)  # fmt: skip


def write_sdxl(path: Path, family=TINY_SDXL, seed: int = 3) -> str:
    """A tiny SDXL-shaped checkpoint with the scalar real files carry (bigG's `logit_scale`)."""
    from safetensors.torch import save_file

    sd = tiny_state_dict(family, seed)
    sd[SDXL_BIGG_PREFIX + "logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> str:
    return write_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors")


def reference_unet_text_time(state_dict: dict, unet: UNetConfig):
    """diffusers' SDXL UNet holding our UNet's weights. diffusers' config reader only picks the "text_time"
    addition embedding for 2048- or 1280-wide contexts (SDXL base, refiner); this tiny one is 128 wide, so it
    is set here, as that reader sets it for the full-size files."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = _prefixed(state_dict, UNET_PREFIX)
    original = ldm_original_config(unet, VAEConfig())
    params = original["model"]["params"]["unet_config"]["params"]
    params.update(num_classes="sequential", adm_in_channels=unet.adm_in_channels)
    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBEDDING_DIM)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def reference_sdxl_pipeline(checkpoint: str, scheduler, pipeline_class=None, family=TINY_SDXL):
    """diffusers' SDXL pipeline (`pipeline_class`: txt2img by default, img2img or inpaint; base-model settings:
    no aesthetic score, zeros for a missing negative prompt) on a tiny `family` checkpoint's weights."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    sd = load_file(checkpoint)

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    clip_l, bigg = family.text_encoders
    vae = reference_vae(part(VAE_PREFIX), family.unet, family.vae)
    vae.register_to_config(scaling_factor=family.scale_factor)
    tokenizer_2 = reference_tokenizer()
    tokenizer_2.pad_token = "!"  # OpenCLIP's tokenizer pads with id 0
    pipe = (pipeline_class or StableDiffusionXLPipeline)(
        vae=vae, text_encoder=reference_clip_sdxl(part(SDXL_CLIP_L_PREFIX), clip_l.config),
        text_encoder_2=reference_open_clip(part(SDXL_BIGG_PREFIX), bigg.config, SDXL_BIGG_PREFIX)[0],
        tokenizer=reference_tokenizer(), tokenizer_2=tokenizer_2,
        unet=reference_unet_text_time(part(UNET_PREFIX), family.unet), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_scheduler(sampler: str):
    from diffusers import EulerDiscreteScheduler

    if sampler == "ddim":
        return sd15_ddim_scheduler()
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True,
        timestep_spacing="linspace", steps_offset=1,
    )  # fmt: skip


def generate(checkpoint: str, out: Path, sampler: str, *extra: str) -> np.ndarray:
    result = run_cli(
        "txt2img", PROMPT, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS, "--cfg", CFG,
        "--seed", SEED, "--sampler", sampler, "--dtype", "fp32", "--device", "cpu", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


# (our options, diffusers' arguments): no negative prompt (zero embeddings) at the default sizes, and a
# negative prompt with another original size and a crop (diffusers' sizes are (height, width), (top, left)).
CASES = {
    "zero-negative": ((), {}),
    "negative-and-sizes": (
        ("-n", NEGATIVE, "--original-size", "96x80", "--crop", "8,16"),
        {"negative_prompt": NEGATIVE, "original_size": (80, 96), "crops_coords_top_left": (16, 8)},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sampler", ["ddim", "euler_karras"])
def test_cli_equals_diffusers_stable_diffusion_xl_pipeline(sdxl_file, tmp_path, sampler, case):
    options, arguments = CASES[case]
    pipe = reference_sdxl_pipeline(sdxl_file, reference_scheduler(sampler))
    expected = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **arguments,
    ).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    ours = generate(sdxl_file, out, sampler, *options)
    assert np.abs(ours - expected).mean() < 1 / 255
    params = parse_infotext(read_png_parameters(out))[2]
    assert params["Original size"] == ("96x80" if options else f"{SIZE}x{SIZE}")
    assert params["Crop"] == ("8,16" if options else "0,0")


def test_zero_negative_differs_from_encoding_an_empty_one(sdxl_file, tmp_path):
    zero = generate(sdxl_file, tmp_path / "zero.png", "euler")
    empty = generate(sdxl_file, tmp_path / "empty.png", "euler", "-n", "")
    assert not np.array_equal(zero, empty)


def test_sdxl_is_detected_with_its_defaults(sdxl_file):
    from sdcli.header import read_header

    family = detect({k: v.shape for k, v in read_header(Path(sdxl_file)).items()})
    assert (family.name, family.scale_factor, family.default_size, family.prediction) == ("sdxl", 0.13025, 1024, "eps")
    assert [s.config for s in family.text_encoders] == [s.config for s in TINY_SDXL.text_encoders]
    assert family.unet == TINY_SDXL.unet


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--original-size", "96", "--original-size must be two whole numbers like 1024x1024"),
     ("--crop", "a,b", "--crop must be two whole numbers like 0,0")],
)  # fmt: skip
def test_bad_size_options_give_a_one_line_usage_error(sdxl_file, tmp_path, option, value, message):
    result = run_cli("txt2img", PROMPT, "-m", sdxl_file, "--steps", 1, "-o", tmp_path / "x.png", option, value)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sdxl_vae_avoids_fp16_where_it_overflows(sdxl_file, monkeypatch):
    from sdcli.checkpoint import load_model, vae_dtype
    from sdcli.families import SD1

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert vae_dtype(SDXL, torch.float16, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert vae_dtype(SDXL, torch.float16, torch.device("cuda")) == torch.float32
    assert vae_dtype(SDXL, torch.float16, torch.device("mps")) == torch.float32
    assert vae_dtype(SD1, torch.float16, torch.device("cuda")) == torch.float16
    assert vae_dtype(SDXL, torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    model = load_model(sdxl_file, dtype=torch.float16)
    assert next(model.unet.parameters()).dtype == torch.float16
    assert next(model.vae.parameters()).dtype == torch.bfloat16  # the CPU runs bf16


def test_registry_has_the_official_sd21_and_sdxl_base_files():
    from sdcli.model_specs import REGISTRY

    assert {n: (REGISTRY[n].family, REGISTRY[n].filename) for n in ("sd21", "sd21-base", "sdxl")} == {
        "sd21": ("sd2-v", "v2-1_768-ema-pruned.safetensors"),
        "sd21-base": ("sd2", "v2-1_512-ema-pruned.safetensors"),
        "sdxl": ("sdxl", "sd_xl_base_1.0.safetensors"),
    }


def test_from_png_of_an_image_made_without_negative_prompt_regenerates_it(sdxl_file, tmp_path):
    first = generate(sdxl_file, tmp_path / "first.png", "euler")
    result = run_cli(
        "txt2img", "--from-png", tmp_path / "first.png", "-m", sdxl_file, "--dtype", "fp32", "--device", "cpu",
        "-o", tmp_path / "again.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again = np.asarray(Image.open(tmp_path / "again.png").convert("RGB"), dtype=np.float64) / 255
    assert np.array_equal(first, again)


def test_from_png_and_prompt_files_carry_the_size_conditioning(sdxl_file, tmp_path):
    first = generate(sdxl_file, tmp_path / "first.png", "euler", "--original-size", "96x80", "--crop", "8,16")
    assert not np.array_equal(first, generate(sdxl_file, tmp_path / "plain.png", "euler"))  # it changes the image
    result = run_cli(
        "txt2img", "--from-png", tmp_path / "first.png", "-m", sdxl_file, "--dtype", "fp32", "--device", "cpu",
        "-o", tmp_path / "again.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again.png").convert("RGB"), dtype=np.float64) / 255)
    line = {"prompt": PROMPT, "original_size": "96x80", "crop": "8,16", "output": "line.png"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = run_cli(
        "txt2img", "--prompt-file", tmp_path / "jobs.jsonl", "-m", sdxl_file, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
        "--cfg", CFG, "--seed", SEED, "--sampler", "euler", "--dtype", "fp32", "--device", "cpu", "--outdir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "line.png").convert("RGB"), dtype=np.float64) / 255)
