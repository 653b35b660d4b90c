"""--preview FILE: every --preview-every steps the current denoised estimate is written to FILE (a valid PNG at
the image's size), through TAESD when chosen or downloaded, else the linear approximation; the images the run
writes are the same with or without previews."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randomize_, run_cli
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file

import sdcli.pipeline
from sdcli.preview import SD_LATENT_RGB

STEPS = 4


def generate(checkpoint, out, *extra):
    result = run_cli(
        "txt2img", "a harbour", "-m", checkpoint, "-W", 64, "-H", 80, "--steps", STEPS, "--seed", 3,
        "--sampler", "euler", "--dtype", "fp32", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out.read_bytes()


@pytest.fixture
def writes(monkeypatch):
    """Every (path, overwrite) the preview writer asked `save_png` for."""
    seen = []
    original = sdcli.pipeline.save_png

    def spy(image, path, parameters=None, overwrite=False):
        seen.append((path, overwrite))
        return original(image, path, parameters, overwrite=overwrite)

    monkeypatch.setattr(sdcli.pipeline, "save_png", spy)
    return seen


def test_preview_is_written_every_n_steps_and_changes_nothing(tiny_checkpoint, tmp_path, writes):
    plain = generate(tiny_checkpoint, tmp_path / "plain.png")
    preview = tmp_path / "sub" / "preview.png"
    watched = generate(tiny_checkpoint, tmp_path / "watched.png", "--preview", preview, "--preview-every", 2)
    assert watched == plain
    assert writes == [(preview, True), (preview, True)]  # after steps 2 and 4, replacing the file
    with Image.open(preview) as image:
        image.verify()
    with Image.open(preview) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (64, 80), "RGB")
    assert [p.name for p in preview.parent.iterdir()] == ["preview.png"]  # no temporary file left


def test_default_is_every_five_steps(tiny_checkpoint, tmp_path, writes):
    generate(tiny_checkpoint, tmp_path / "a.png", "--preview", tmp_path / "p.png")
    assert writes == []  # 4 steps: none reaches the fifth
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", 5, "--dtype", "fp32",
                     "--preview", tmp_path / "p.png", "-o", tmp_path / "b.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(writes) == 1


def test_linear_preview_is_the_cheap_approximation_of_the_last_estimate(tiny_checkpoint, tmp_path, monkeypatch):
    """Without TAESD, the preview is the denoised latents times A1111's latent-to-RGB factors, 8x nearest."""
    denoised = []
    original = sdcli.pipeline.preview_writer

    def capture(*args, **kwargs):
        write = original(*args, **kwargs)

        def wrapped(info):
            if "denoised" in info:  # not the "decode" stage
                denoised.append(info["denoised"].clone())
            write(info)

        return wrapped

    monkeypatch.setattr(sdcli.pipeline, "preview_writer", capture)
    generate(tiny_checkpoint, tmp_path / "a.png", "--preview", tmp_path / "p.png", "--preview-every", STEPS)
    rgb = np.einsum("chw,cr->hwr", denoised[-1][0].numpy().astype(np.float64), np.array(SD_LATENT_RGB))
    expected = np.clip(rgb.repeat(8, axis=0).repeat(8, axis=1) * 0.5 + 0.5, 0, 1)
    ours = np.asarray(Image.open(tmp_path / "p.png"), dtype=np.float64) / 255
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6


def test_taesd_preview_of_the_last_step_is_the_image(tiny_checkpoint, tmp_path):
    """Euler's last step lands on its denoised estimate, so with TAESD the last preview is the image itself."""
    path = tmp_path / "t.safetensors"
    model = randomize_(AutoencoderTiny(), seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    preview = tmp_path / "p.png"
    generate(tiny_checkpoint, tmp_path / "a.png", "--vae", path, "--preview", preview, "--preview-every", STEPS)
    ours = np.asarray(Image.open(preview), dtype=np.float64)
    image = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float64)
    assert ours.shape == image.shape == (80, 64, 3)
    assert np.abs(ours - image).max() <= 1


def test_downloaded_taesd_is_used_for_previews_without_vae_option(tiny_checkpoint, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    model = randomize_(AutoencoderTiny(), seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights / "taesd.safetensors"))
    used = []
    original = sdcli.pipeline.preview_writer
    monkeypatch.setattr(sdcli.pipeline, "preview_writer", lambda *a, **k: used.append(a[3]) or original(*a, **k))
    plain = generate(tiny_checkpoint, tmp_path / "plain.png", "--weights-dir", weights)
    watched = generate(
        tiny_checkpoint,
        tmp_path / "w.png",
        "--weights-dir",
        weights,
        "--preview",
        tmp_path / "p.png",
        "--preview-every",
        2,
    )
    assert watched == plain  # TAESD found for the preview does not replace the model's VAE
    assert used[0] is not None and used[0].decoder is not None
    with Image.open(tmp_path / "p.png") as image:
        assert image.size == (64, 80)


def test_bad_preview_every_is_a_usage_error(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "--preview", tmp_path / "p.png", "--preview-every", 0)
    assert result.exit_code == 2
    assert not (tmp_path / "p.png").exists()
