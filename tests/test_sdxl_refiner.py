"""The SDXL refiner (sd_xl_refiner_1.0): detected as `sdxl-refiner`, its UNet and full-size layout against diffusers'
conversion, and `sdcli img2img` end to end against diffusers' StableDiffusionXLImg2ImgPipeline.

The refiner has bigG alone (`conditioner.embedders.0.model.`) and a label embedding of its pooled output and five
256-wide numbers: original size, crop top-left and an aesthetic score (the negative one for the unconditional
branch). The reference is set up as diffusers' refiner is (`requires_aesthetics_score=True`,
`force_zeros_for_empty_prompt=False`: a missing negative prompt encodes ""); the noise as in test_sdxl_img2img.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, run_cli, tiny_state_dict
from PIL import Image
from reference import (
    _prefixed,
    assert_close,
    assert_same_image,
    reference_open_clip,
    reference_tokenizer,
    reference_unet_sdxl,
    reference_vae,
)
from test_img2img import patch_vae_sampling, pixels, sdcli_latent_noises
from test_layout_sd2_sdxl import meta_state_dict, numel, reference_unet_from_yaml
from test_sdxl import reference_scheduler, reference_unet_text_time

from sdcli.errors import CheckpointError
from sdcli.families import SDXL_REFINER, SDXL_REFINER_BIGG_PREFIX, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.header import read_header
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.models.configs import OpenClipConfig, UNetConfig, VAEConfig
from sdcli.models.openclip import OpenClipTextModel
from sdcli.models.sdxl_size import SIZE_EMBEDDING_DIM, sdxl_y
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a lighthouse at dusk", "grainy", 21, 8, 6.0, 64
PROJECTION = 32
# Five numbers after the pooled embedding: original height, width, crop top, left, aesthetic score.
REFINER_NUMBERS = 5

# The refiner's shape in small: bigG alone (its penultimate state is the whole context), no attention at the
# first level, 64-wide heads, a label embedding for the pooled output and the five numbers.
TINY_REFINER = replace(
    SDXL_REFINER,
    unet=UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2), transformer_depth_middle=2,
        num_head_channels=64, context_dim=64, use_linear_in_transformer=True,
        adm_in_channels=PROJECTION + REFINER_NUMBERS * SIZE_EMBEDDING_DIM,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_encoders=(
        replace(
            SDXL_REFINER.text_encoders[0],
            config=OpenClipConfig(width=64, layers=3, heads=1, mlp_width=128, projection_dim=PROJECTION),
        ),
    ),
)  # fmt: skip
# model.params.network_config.params of generative-models' configs/inference/sd_xl_refiner.yaml.
REFINER_YAML = {
    "adm_in_channels": 2560, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
    "out_channels": 4, "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280],
    "spatial_transformer_attn_type": "softmax-xformers", "legacy": False,
}  # fmt: skip
# Two tiny refiner-shaped UNets; diffusers recognises the refiner's "text_time" embedding by a 1280-wide context.
TINY_REFINER_UNETS = {
    "a": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2, 0),
        transformer_depth_middle=2, num_head_channels=16, context_dim=1280, use_linear_in_transformer=True,
        adm_in_channels=24 + REFINER_NUMBERS * SIZE_EMBEDDING_DIM,
    ),
    "b": UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(0, 3), transformer_depth_middle=3,
        num_head_channels=32, context_dim=1280, use_linear_in_transformer=True,
        adm_in_channels=40 + REFINER_NUMBERS * SIZE_EMBEDDING_DIM,
    ),
}  # fmt: skip


def write_refiner(path: Path, seed: int = 4) -> str:
    """A tiny refiner-shaped checkpoint with the scalar real files carry (bigG's `logit_scale`)."""
    from safetensors.torch import save_file

    sd = tiny_state_dict(TINY_REFINER, seed)
    sd[SDXL_REFINER_BIGG_PREFIX + "logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("sdxl-refiner")
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 255, SIZE)
    rgb = np.stack([ramp[None, :].repeat(SIZE, 0), rng.uniform(0, 255, (SIZE, SIZE)), ramp[:, None].repeat(SIZE, 1)])
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(folder / "init.png")
    return write_refiner(folder / "tiny-refiner.safetensors"), str(folder / "init.png")


def test_refiner_is_detected_with_its_settings(files):
    family = detect({k: v.shape for k, v in read_header(Path(files[0])).items()})
    assert family.name == "sdxl-refiner" and family.unet == TINY_REFINER.unet
    assert [(s.prefix, s.config) for s in family.text_encoders] == [
        (s.prefix, s.config) for s in TINY_REFINER.text_encoders
    ]
    assert (family.scale_factor, family.default_size, family.zero_missing_negative, family.aesthetic_score) == (
        0.13025, 1024, False, True,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(TINY_REFINER_UNETS))
def test_refiner_shaped_unet_matches_diffusers_text_time_with_an_aesthetic_score(name):
    cfg = TINY_REFINER_UNETS[name]
    ours = randomize_(UNetModel(cfg), seed=9)
    ref = reference_unet_sdxl(ours.state_dict(), cfg)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([999.0, 3.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.adm_in_channels - REFINER_NUMBERS * SIZE_EMBEDDING_DIM, generator=g)
    # (original h, w, crop top, left, aesthetic score): the defaults, and another size, a crop, a low score.
    numbers = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [512.0, 768.0, 16.0, 32.0, 2.5]])
    with torch.no_grad():
        expected = ref(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}
        ).sample
        assert_close(ours(x, t, context, y=sdxl_y(pooled, numbers)), expected)


def test_full_size_refiner_layout_is_what_diffusers_expects_and_is_detected():
    from diffusers.loaders import single_file_utils as sfu

    unet = meta_state_dict(UNetModel, SDXL_REFINER.unet, UNET_PREFIX)
    ref = reference_unet_from_yaml(REFINER_YAML, unet)
    assert ref.config.addition_embed_type == "text_time" and ref.add_embedding.linear_1.in_features == 2560
    assert numel(unet.values()) == numel(ref.parameters())
    (spec,) = SDXL_REFINER.text_encoders
    tower = meta_state_dict(OpenClipTextModel, spec.config)
    text, ignored = reference_open_clip(tower, spec.config, SDXL_REFINER_BIGG_PREFIX, device="meta")
    assert not ignored and numel(tower.values()) == numel(text.parameters())
    assert spec.config.width == SDXL_REFINER.unet.context_dim
    assert spec.config.projection_dim + REFINER_NUMBERS * SIZE_EMBEDDING_DIM == SDXL_REFINER.unet.adm_in_channels
    checkpoint = unet | meta_state_dict(AutoencoderKL, SDXL_REFINER.vae, VAE_PREFIX) | _prefixed(tower, spec.prefix)
    assert sfu.infer_diffusers_model_type(checkpoint) == "xl_refiner"
    assert detect({k: tuple(v.shape) for k, v in checkpoint.items()}) == SDXL_REFINER


def reference_refiner_pipeline(checkpoint: str, scheduler):
    """diffusers' SDXL img2img pipeline set up as its refiner (bigG alone, aesthetic scores, "" for a missing
    negative prompt) on the tiny refiner's weights."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors.torch import load_file

    sd = load_file(checkpoint)

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    (bigg,) = TINY_REFINER.text_encoders
    vae = reference_vae(part(VAE_PREFIX), TINY_REFINER.unet, TINY_REFINER.vae)
    vae.register_to_config(scaling_factor=TINY_REFINER.scale_factor)
    tokenizer_2 = reference_tokenizer()
    tokenizer_2.pad_token = "!"  # OpenCLIP's tokenizer pads with id 0
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, tokenizer_2=tokenizer_2,
        text_encoder_2=reference_open_clip(part(SDXL_REFINER_BIGG_PREFIX), bigg.config, SDXL_REFINER_BIGG_PREFIX)[0],
        unet=reference_unet_text_time(part(UNET_PREFIX), TINY_REFINER.unet), scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (sampler, strength, our options, diffusers' arguments): no negative prompt ("" encoded) and the default scores
# (6 and 2.5); a negative prompt with another original size, a crop and other scores. sgm gives both branches
# the same crop; diffusers' negative crop is a separate argument (default (0, 0)), so it is passed.
CASES = {
    "ddim-defaults": ("ddim", 0.75, (), {}),
    "euler-karras-negative-sizes-scores": (
        "euler_karras", 0.5,
        ("-n", NEGATIVE, "--original-size", "96x80", "--crop", "8,16", "--aesthetic-score", "7.5",
         "--negative-aesthetic-score", "1"),
        {"negative_prompt": NEGATIVE, "original_size": (80, 96), "crops_coords_top_left": (16, 8),
         "negative_crops_coords_top_left": (16, 8), "aesthetic_score": 7.5, "negative_aesthetic_score": 1.0},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_img2img_equals_diffusers_sdxl_img2img_pipeline_as_refiner(files, tmp_path, monkeypatch, case):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    sampler, strength, options, arguments = CASES[case]
    checkpoint, init = files
    _, vae_noise = sdcli_latent_noises(SEED, 2)
    patch_vae_sampling(monkeypatch, module, [vae_noise])
    pipe = reference_refiner_pipeline(checkpoint, reference_scheduler(sampler))
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
    params = parse_infotext(read_png_parameters(out))[2]
    scores = (params["Aesthetic score"], params["Negative aesthetic score"])
    assert scores == (("7.5", "1.0") if options else ("6.0", "2.5"))


def txt2img(checkpoint: str, out: Path, *extra) -> np.ndarray:
    result = run_cli(
        "txt2img", PROMPT, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 3, "--seed", SEED,
        "--sampler", "euler", "--dtype", "fp32", "--device", "cpu", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return pixels(out)


def test_txt2img_scores_change_the_image_and_from_png_and_prompt_files_carry_them(files, tmp_path):
    checkpoint = files[0]
    first = txt2img(checkpoint, tmp_path / "first.png", "--aesthetic-score", "9", "--negative-aesthetic-score", "0")
    assert not np.array_equal(first, txt2img(checkpoint, tmp_path / "plain.png"))  # the scores reach the UNet
    result = run_cli(
        "txt2img", "--from-png", tmp_path / "first.png", "-m", checkpoint, "--dtype", "fp32", "--device", "cpu",
        "-o", tmp_path / "again.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(first, pixels(tmp_path / "again.png"))
    line = {"prompt": PROMPT, "aesthetic_score": 9, "negative_aesthetic_score": 0, "output": "line.png"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    result = run_cli(
        "txt2img", "--prompt-file", tmp_path / "jobs.jsonl", "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 3,
        "--seed", SEED, "--sampler", "euler", "--dtype", "fp32", "--device", "cpu", "--outdir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(first, pixels(tmp_path / "line.png"))


@pytest.mark.parametrize("option", ["--aesthetic-score", "--negative-aesthetic-score"])
def test_an_aesthetic_score_out_of_range_is_a_one_line_usage_error(files, tmp_path, option):
    result = run_cli("txt2img", PROMPT, "-m", files[0], "--steps", 1, "-o", tmp_path / "x.png", option, "11")
    assert result.exit_code == 2 and not (tmp_path / "x.png").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "aesthetic score must be a number between 0 and 10, got 11" in line


def test_models_lists_the_refiner(files, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tiny-refiner.safetensors").symlink_to(files[0])
    result = run_cli("models", "--weights-dir", folder, "--json")
    assert result.exit_code == 0, result.output
    (row,) = map(json.loads, result.stdout.splitlines())
    assert (row["family"], row["prediction"]) == ("sdxl-refiner", "eps")


def test_an_sdxl_embedding_gives_the_refiner_its_clip_g_vectors(tmp_path):
    from safetensors.torch import save_file

    from sdcli.embeddings import load_embedding
    from sdcli.families import SD2

    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 64)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    (vectors,) = load_embedding(tmp_path / "xl.safetensors", TINY_REFINER).vectors
    assert torch.equal(vectors, clip_g)
    with pytest.raises(CheckpointError, match="an SDXL embedding"):
        load_embedding(tmp_path / "xl.safetensors", SD2)
