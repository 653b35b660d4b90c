"""The bf16 path end to end: the CLI with `--dtype bf16` on the tiny checkpoint against diffusers in fp32.

A bf16 image cannot equal the fp32 reference (bf16 keeps 8 bits of mantissa), so how far it may be is measured
in each test, not pasted: the reference runs in bf16 and in fp32 on the same inputs, and sdcli's bf16 image must
be no further from the fp32 reference than `K` times the reference's own move, plus sdcli's distance from it in
fp32 (what is not precision). Both sides start from the same noise and the same weights, as in test_txt2img and
test_img2img; tiny models keep this fast even on CPUs that emulate bf16.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from PIL import Image
from reference import reference_models_from_file, reference_pipeline
from test_img2img import pixels, sdcli_latent_noises

# sdcli runs only the networks in bf16 and samples in fp32, while diffusers' pipeline in bf16 also keeps its
# latents and scheduler arithmetic in bf16, so sdcli is expected about as far from fp32 as the reference moves.
# Measured on an AVX512-BF16 CPU (mean absolute difference in [0, 1] after 8-bit rounding): txt2img 0.0019 against
# the reference's 0.0023; the VAE round trip 0.0035 against 0.0032; sdcli in fp32 0 in both. K = 2 leaves room
# for bf16 kernels that round differently elsewhere (oneDNN's native bf16, or PyTorch's emulation on AVX2 CPUs)
# and still holds sdcli's bf16 image to within 1.2/255 (txt2img) and 1.6/255 (VAE) per pixel, on average, of fp32.
K = 2
PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "a photo of a cat", "blurry", 1234, 6, 5.0, 64


def as_png(image: np.ndarray) -> np.ndarray:
    """A [0, 1] float image rounded to 8 bits as a PNG stores it, so that rounding is not counted as error."""
    return np.round(image * 255) / 255


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def assert_bf16_within_reference_drift(ours16, ours32, reference16, reference32) -> None:
    """sdcli's bf16 image is within K times the reference's bf16-vs-fp32 distance of the fp32 reference."""
    reference32, reference16 = as_png(reference32), as_png(reference16)
    drift = mean_abs(reference16, reference32)
    floor = mean_abs(ours32, reference32)
    error = mean_abs(ours16, reference32)
    assert drift > 0, "the reference did not run in bf16"
    assert not np.array_equal(ours16, ours32), "sdcli did not run in bf16"
    assert error <= floor + K * drift, f"bf16 error {error:.5f} > {floor:.5f} + {K} x reference drift {drift:.5f}"


def cli_image(out, *args) -> np.ndarray:
    result = run_cli(*args, "-o", out)
    assert result.exit_code == 0, result.output
    return pixels(out)


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "init.png"
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def test_txt2img_bf16_stays_within_the_reference_pipeline_s_own_bf16_drift(tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    args = ["txt2img", PROMPT, "-n", NEGATIVE, "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
            "--cfg", CFG, "--seed", SEED, "--sampler", "ddim"]  # fmt: skip
    ours16 = cli_image(tmp_path / "bf16.png", *args, "--dtype", "bf16")
    ours32 = cli_image(tmp_path / "fp32.png", *args, "--dtype", "fp32")

    (noise,) = sdcli_latent_noises(SEED, 1)
    pipe = reference_pipeline(StableDiffusionPipeline, tiny_checkpoint, TINY_SD1)

    def reference(dtype: torch.dtype) -> np.ndarray:
        pipe.to(dtype=dtype)
        images = pipe(
            PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
            latents=noise.to(dtype), output_type="np",
        ).images  # fmt: skip
        return images[0].astype(np.float64)

    reference32 = reference(torch.float32)
    assert_bf16_within_reference_drift(ours16, ours32, reference(torch.bfloat16), reference32)


def test_img2img_bf16_vae_round_trip_stays_within_the_reference_vae_s_own_bf16_drift(
    tiny_checkpoint, init_png, tmp_path
):
    args = ["img2img", PROMPT, "--init", init_png, "-m", tiny_checkpoint, "--strength", 0, "--seed", SEED]
    ours16 = cli_image(tmp_path / "bf16.png", *args, "--dtype", "bf16")
    ours32 = cli_image(tmp_path / "fp32.png", *args, "--dtype", "fp32")

    _, vae, _ = reference_models_from_file(tiny_checkpoint, TINY_SD1)
    image = torch.from_numpy(pixels(init_png)).float().permute(2, 0, 1)[None] * 2 - 1
    _, eps = sdcli_latent_noises(SEED, 2)

    def reference(dtype: torch.dtype) -> np.ndarray:
        vae.to(dtype)
        with torch.no_grad():
            dist = vae.encode(image.to(dtype)).latent_dist
            decoded = vae.decode(dist.mean + dist.std * eps.to(dtype)).sample.float()
        return (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()

    reference32 = reference(torch.float32)
    assert_bf16_within_reference_drift(ours16, ours32, reference(torch.bfloat16), reference32)
