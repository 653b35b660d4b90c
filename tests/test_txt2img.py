"""txt2img end to end: the CLI on a tiny random checkpoint against references built from diffusers' models.

The reference never uses our networks or samplers: its models are diffusers/transformers modules loaded
from the same file through diffusers' own conversion, driven by diffusers' pipeline (DDIM) or by
k-diffusion's samplers. Both sides start from the noise that seed gives on a CPU generator.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from kdiffusion_ref import eps_denoiser
from kdiffusion_ref import load as load_kdiffusion
from PIL import Image
from reference import reference_models_from_file, reference_pipeline, reference_tokenizer

from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a photo of a cat", "blurry", 1234, 6, 5.0, 64


def generate(checkpoint: str, out: Path, sampler: str, *extra: str):
    """The CLI's image in [0, 1], in fp32 like the references (see tests/test_bf16.py for bf16)."""
    result = run_cli(
        "txt2img", PROMPT, "-n", NEGATIVE, "-m", checkpoint, "-W", str(SIZE), "-H", str(SIZE),
        "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED), "--sampler", sampler,
        "--dtype", "fp32", "-o", str(out), *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def reference_models(tiny_checkpoint):
    return reference_models_from_file(tiny_checkpoint, TINY_SD1)


def to_unit_range(images: torch.Tensor) -> np.ndarray:
    return (images / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()


def test_ddim_equals_diffusers_stable_diffusion_pipeline(tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = reference_pipeline(StableDiffusionPipeline, tiny_checkpoint, TINY_SD1)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    ours = generate(tiny_checkpoint, tmp_path / "ddim.png", "ddim")
    assert np.abs(ours - expected).mean() < 1 / 255


class _EpsDenoiser:
    """k-diffusion's discrete eps denoiser around diffusers' UNet, with classifier-free guidance."""

    def __init__(self, unet, cond, uncond):
        self.model = eps_denoiser(unet)
        self.cond, self.uncond = cond, uncond

    def __call__(self, x, sigma):
        out = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([self.uncond, self.cond]))
        uncond, cond = out.chunk(2)
        return uncond + CFG * (cond - uncond)


@pytest.mark.parametrize(
    ("sampler", "kd_name", "karras"),
    [("euler", "sample_euler", False), ("dpmpp_2m_karras", "sample_dpmpp_2m", True),
     ("Euler a", "sample_euler_ancestral", False)],
)  # fmt: skip
def test_sigma_samplers_equal_kdiffusion_on_diffusers_models(
    tiny_checkpoint, reference_models, tmp_path, sampler, kd_name, karras
):
    sampling, _ = load_kdiffusion()
    unet, vae, clip = reference_models
    tokenizer = reference_tokenizer()

    def embed(text):
        ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return clip(ids).last_hidden_state

    with torch.no_grad():
        denoiser = _EpsDenoiser(unet, embed(PROMPT), embed(NEGATIVE))
        if karras:
            sigmas = sampling.get_sigmas_karras(STEPS, denoiser.model.sigma_min.item(), denoiser.model.sigma_max.item())
        else:
            sigmas = denoiser.model.get_sigmas(STEPS)
        generator = torch.Generator("cpu").manual_seed(SEED)
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator) * sigmas[0]
        # Our convention: an image's ancestral noise continues from its own seeded CPU generator.
        kwargs = {"noise_sampler": lambda s, s_next: torch.randn(x.shape, generator=generator)}
        latents = getattr(sampling, kd_name)(
            denoiser, x, sigmas, disable=True, **(kwargs if "ancestral" in kd_name else {})
        )
        expected = to_unit_range(vae.decode(latents / 0.18215).sample)
    ours = generate(tiny_checkpoint, tmp_path / "out.png", sampler)
    assert np.abs(ours - expected).mean() < 1 / 255


def test_same_command_twice_gives_identical_bytes(tiny_checkpoint, tmp_path):
    generate(tiny_checkpoint, tmp_path / "a.png", "Euler a")
    generate(tiny_checkpoint, tmp_path / "b.png", "Euler a")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_parameters_chunk_parses_back_to_the_values_used(tiny_checkpoint, tmp_path):
    out = tmp_path / "p.png"
    generate(tiny_checkpoint, out, "dpmpp_2m_karras")
    prompt, negative, params = parse_infotext(read_png_parameters(out))
    assert (prompt, negative) == (PROMPT, NEGATIVE)
    assert params["Steps"] == str(STEPS)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")  # as A1111 1.9 writes them
    assert float(params["CFG scale"]) == CFG
    assert params["Seed"] == str(SEED)
    assert params["Size"] == f"{SIZE}x{SIZE}"
    assert params["Model"] == Path(tiny_checkpoint).stem
    import hashlib

    assert params["Model hash"] == hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()[:10]


def test_several_images_use_consecutive_seeds_and_each_regenerates_alone(tiny_checkpoint, tmp_path):
    result = run_cli(
        "txt2img", PROMPT, "-m", tiny_checkpoint, "-W", "64", "-H", "64", "--steps", "3", "--seed", "7",
        "--n", "3", "--batch-size", "2", "--sampler", "euler_a", "--dtype", "fp32", "-o", str(tmp_path / "many.png"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name for p in paths] == ["many-0001.png", "many-0002.png", "many-0003.png"]
    seeds = [parse_infotext(read_png_parameters(p))[2]["Seed"] for p in paths]
    assert seeds == ["7", "8", "9"]
    alone = run_cli(
        "txt2img", PROMPT, "-m", tiny_checkpoint, "-W", "64", "-H", "64", "--steps", "3", "--seed", "8",
        "--sampler", "euler_a", "--dtype", "fp32", "-o", str(tmp_path / "alone.png"),
    )  # fmt: skip
    assert alone.exit_code == 0, alone.output
    a = np.asarray(Image.open(paths[1]), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "alone.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # batched fp32 matmuls may round differently in the last bit


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-W", "100"], 2, "width must be a multiple of 8"),
        (["--sampler", "nonsense"], 2, "unknown sampler 'nonsense'; valid names: euler"),
        (["-m", "missing.safetensors"], 1, "no such model file"),
    ],
)
def test_bad_input_gives_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, args, code, message):
    out = tmp_path / "never.png"
    base = ["txt2img", PROMPT, "-m", tiny_checkpoint, "--steps", "2", "-o", str(out)]
    result = run_cli(*base, *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
