"""SD 2.x end to end: the CLI on tiny SD 2.x-shaped checkpoints (eps and v) equals diffusers' pipeline.

The reference is diffusers' `StableDiffusionPipeline` on diffusers/transformers models holding the same
file's weights through diffusers' own single-file conversion (`convert_open_clip_checkpoint` for the
OpenCLIP tower), with the scheduler's prediction type set to the one the file declares. Both sides start
from the noise the seed gives on a CPU generator.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_state_dict
from PIL import Image
from reference import reference_open_clip, reference_tokenizer, reference_unet, reference_vae, sd15_ddim_scheduler

from sdcli.families import OPENCLIP_PREFIX, SD2, SD2_INPAINT, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.models.configs import OpenClipConfig, UNetConfig, VAEConfig

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a photo of a cat", "blurry", 1234, 5, 5.0, 64

# SD 2.x's shape in small: 64-wide heads, linear proj_in/out, an OpenCLIP tower (real vocabulary, 64 wide).
TINY_SD2 = replace(
    SD2,
    unet=UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), num_head_channels=64,
        context_dim=64, use_linear_in_transformer=True,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_encoders=(
        replace(
            SD2.text_encoders[0],
            config=OpenClipConfig(width=64, layers=3, heads=1, mlp_width=128, projection_dim=32),
        ),
    ),
)  # fmt: skip


def write_sd2(path: Path, family=TINY_SD2, seed: int = 0, extra: dict | None = None) -> str:
    """A tiny SD 2.x checkpoint with the scalar real files carry (`logit_scale`)."""
    from safetensors.torch import save_file

    sd = tiny_state_dict(family, seed)
    sd[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)
    save_file(sd | (extra or {}), str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    """The same weights as an eps file and as a v file (told apart by the A1111 sidecar YAML)."""
    folder = tmp_path_factory.mktemp("sd2")
    eps = write_sd2(folder / "tiny-sd2.safetensors")
    v = write_sd2(folder / "tiny-sd2-v.safetensors")
    (folder / "tiny-sd2-v.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    return {"eps": eps, "v": v}


def reference_sd2_pipeline(checkpoint: str, family, scheduler, pipeline_class=None):
    """diffusers' SD pipeline (`pipeline_class`: txt2img by default) on a tiny SD 2.x checkpoint's weights."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    sd = load_file(checkpoint)

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    text_encoder, _ = reference_open_clip(part(OPENCLIP_PREFIX), family.text_encoders[0].config, OPENCLIP_PREFIX)
    # As diffusers loads the full-size file (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE): without the last block, so its
    # final-normed last hidden state is SD 2.x's penultimate layer followed by ln_final.
    text_encoder.encoder.layers = text_encoder.encoder.layers[:-1]
    text_encoder.config.num_hidden_layers -= 1
    tokenizer = reference_tokenizer()
    tokenizer.pad_token = "!"  # open_clip pads with id 0, as SD 2.x's diffusers tokenizer does
    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=reference_vae(part(VAE_PREFIX), family.unet, family.vae), text_encoder=text_encoder,
        tokenizer=tokenizer, unet=reference_unet(part(UNET_PREFIX), family.unet, family.vae), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_scheduler(sampler: str, prediction: str):
    from diffusers import EulerDiscreteScheduler

    prediction_type = "v_prediction" if prediction == "v" else "epsilon"
    if sampler == "ddim":
        ddim = sd15_ddim_scheduler()
        return type(ddim).from_config(ddim.config, prediction_type=prediction_type)
    # k-diffusion's Karras grid over the whole training range, started at x = sigma_max * noise.
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True,
        timestep_spacing="linspace", steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip


def generate(checkpoint: str, out: Path, sampler: str, *extra: str) -> np.ndarray:
    result = run_cli(
        "txt2img", PROMPT, "-n", NEGATIVE, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
        "--cfg", CFG, "--seed", SEED, "--sampler", sampler, "--dtype", "fp32", "--device", "cpu", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "euler_karras"])
def test_cli_equals_diffusers_stable_diffusion_pipeline(sd2_files, tmp_path, prediction, sampler):
    checkpoint = sd2_files[prediction]
    pipe = reference_sd2_pipeline(checkpoint, TINY_SD2, reference_scheduler(sampler, prediction))
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    ours = generate(checkpoint, out, sampler)
    assert np.abs(ours - expected).mean() < 1 / 255
    params = parse_infotext(read_png_parameters(out))[2]
    assert params["Prediction"] == prediction


def test_prediction_option_overrides_the_sidecar(sd2_files, tmp_path):
    v_file = generate(sd2_files["v"], tmp_path / "v.png", "euler")
    forced = generate(sd2_files["v"], tmp_path / "forced.png", "euler", "--prediction", "eps")
    eps_file = generate(sd2_files["eps"], tmp_path / "eps.png", "euler")
    assert np.array_equal(forced, eps_file) and not np.array_equal(v_file, eps_file)
    assert parse_infotext(read_png_parameters(tmp_path / "forced.png"))[2]["Prediction"] == "eps"


def test_detection_finds_sd2_and_its_inpainting_model(sd2_files, tmp_path):
    from sdcli.prediction import detect_file

    family, prediction = detect_file(Path(sd2_files["v"]))
    assert (family.name, family.prediction, family.default_size) == ("sd2-v", "v", 768)
    assert prediction.source == "tiny-sd2-v.yaml"
    assert detect_file(Path(sd2_files["eps"]))[0].name == "sd2"
    inpaint = replace(TINY_SD2, unet=replace(TINY_SD2.unet, in_channels=9))
    shapes = {k: tuple(v.shape) for k, v in tiny_state_dict(inpaint).items()}
    found = detect(shapes)
    assert found.name == SD2_INPAINT.name and found.unet.in_channels == 9
    assert found.text_encoders[0].config == TINY_SD2.text_encoders[0].config


def test_models_lists_family_and_prediction(sd2_files, tmp_path):
    import json
    import shutil

    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("tiny-sd2.safetensors", "tiny-sd2-v.safetensors", "tiny-sd2-v.yaml"):
        shutil.copy(Path(sd2_files["eps"]).parent / name, folder / name)
    result = run_cli("models", "--weights-dir", folder, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert (rows["tiny-sd2"]["family"], rows["tiny-sd2"]["prediction"]) == ("sd2", "eps")
    assert (rows["tiny-sd2-v"]["family"], rows["tiny-sd2-v"]["prediction"]) == ("sd2-v", "v")
