"""--vae FILE: a replacement VAE in the original layout (with or without `first_stage_model.`) or diffusers'
gives the image of diffusers' pipeline whose VAE holds the replacement's weights, and is recorded as A1111
records it (`VAE hash`: the file's sha256, 10 digits; `VAE`: the file name)."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, randomize_, run_cli
from PIL import Image
from reference import reference_pipeline, reference_vae
from safetensors.torch import save_file

from sdcli.checkpoint import load_model, vae_file_infos
from sdcli.errors import CheckpointError
from sdcli.families import VAE_PREFIX
from sdcli.header import read_header
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.models.vae import AutoencoderKL

PROMPT, SEED, STEPS, CFG, SIZE = "a lighthouse", 5, 4, 6.0, 64


@pytest.fixture(scope="module")
def replacement(tmp_path_factory):
    """A random VAE (not the checkpoint's), as our state dict and as files in the three layouts."""
    folder = tmp_path_factory.mktemp("vae")
    ours = {k: v.contiguous() for k, v in randomize_(AutoencoderKL(TINY_SD1.vae), seed=99).state_dict().items()}
    files = {
        "prefixed": {VAE_PREFIX + k: v for k, v in ours.items()},
        "bare": {**ours, "model_ema.decay": torch.tensor(0.9999)},
        "diffusers": reference_vae(ours, TINY_SD1.unet, TINY_SD1.vae).state_dict(),
    }
    paths = {}
    for layout, tensors in files.items():
        paths[layout] = folder / f"vae-{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[layout]))
    return ours, paths


def test_vae_file_equals_diffusers_pipeline_with_that_vae_in_every_layout(tiny_checkpoint, replacement, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours, paths = replacement
    pipe = reference_pipeline(StableDiffusionPipeline, tiny_checkpoint, TINY_SD1)
    pipe.vae = reference_vae(ours, TINY_SD1.unet, TINY_SD1.vae)
    expected = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    images = {}
    for layout, path in paths.items():
        out = tmp_path / f"{layout}.png"
        result = run_cli(
            "txt2img", PROMPT, "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS, "--cfg", CFG,
            "--seed", SEED, "--sampler", "ddim", "--dtype", "fp32", "--vae", path, "-o", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        images[layout] = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255
        params = parse_infotext(read_png_parameters(out))[2]
        assert params["VAE"] == path.name
        assert params["VAE hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        assert list(params).index("VAE") == list(params).index("Model") + 2  # after Model hash, Model, VAE hash
    for layout, image in images.items():
        assert np.abs(image - expected).mean() < 1 / 255, layout


def test_every_layout_loads_the_same_weights_and_leaves_the_rest_of_the_model(tiny_checkpoint, replacement):
    ours, paths = replacement
    plain = load_model(tiny_checkpoint)
    for path in paths.values():
        model = load_model(tiny_checkpoint, vae=path)
        assert model.vae_path == path
        for key, value in model.vae.state_dict().items():
            assert torch.equal(value, ours[key]), key
        for a, b in zip(model.unet.state_dict().values(), plain.unet.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_files_that_are_not_a_vae_are_one_line_errors(tiny_checkpoint, replacement, tmp_path):
    _, paths = replacement
    not_vae = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_vae))
    with pytest.raises(CheckpointError, match="not a VAE"):
        vae_file_infos(not_vae, read_header(not_vae))
    stray = tmp_path / "stray.safetensors"
    save_file({**ours_like(paths["diffusers"]), "decoder.up_blocks.0.extra.weight": torch.zeros(1)}, str(stray))
    with pytest.raises(CheckpointError, match="match nothing"):
        vae_file_infos(stray, read_header(stray))
    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 1, "--vae", pickle,
                     "-o", tmp_path / "x.png")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "vae.pt" in result.stderr
    assert not (tmp_path / "x.png").exists()


def ours_like(path):
    from safetensors.torch import load_file

    return load_file(str(path))
